"""`gradsync lab up --cpus`: a capped host's processes run in a cgroup whose CPU bandwidth
is the cap, created with the lab and removed with it (the straggler check that uses it is a
benchmark: docs/benchmarks.md section 19)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gradsync.lab import LabError, run_command, up
from gradsync.lab import cpu
from tests.helpers import needs_netns


def _has_cgroups() -> bool:
    try:
        cpu.cgroup_root()
    except LabError:
        return False
    return True


@pytest.mark.timeout(10)
def test_cpus_parse_one_cap_per_host_and_bad_values_are_one_line():
    assert cpu.parse_cpus("0.5,max,2", 3) == [0.5, None, 2.0]
    assert cpu.parse_cpus("0.25", 2) == [0.25, 0.25]
    for bad, match in (("0.5,1", "2 caps for 3 hosts"), ("half,1,1", "bad --cpus value 'half'"),
                       ("0,1,1", "bad --cpus value '0'")):
        with pytest.raises(LabError, match=match):
            cpu.parse_cpus(bad, 3)
    argv = cpu.join_argv("/cg/h0", ["ip", "netns", "exec", "ns", "python"])
    assert argv[:2] == ["sh", "-c"] and argv[3:] == ["/cg/h0", "ip", "netns", "exec", "ns",
                                                     "python"]


@needs_netns
@pytest.mark.skipif(not _has_cgroups(), reason="no cgroup cpu controller")
@pytest.mark.timeout(60)
def test_a_capped_hosts_ranks_run_in_its_cgroup_which_goes_with_the_lab(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADSYNC_LAB_DIR", str(tmp_path / "labs"))
    seen: dict[int, str] = {}
    with up(2, "1gbit", cpus="0.5,max", name="t-cpus") as lab:
        group = Path(lab.hosts[0].cgroup)
        assert lab.hosts[1].cgroup is None and lab.hosts[0].cpus == 0.5
        quota = (group / "cpu.max").read_text().split() if (group / "cpu.max").exists() else \
            [(group / f"cpu.cfs_{k}_us").read_text().strip() for k in ("quota", "period")]
        assert quota == ["50000", "100000"]
        rc = run_command(lab, [sys.executable, "-c", "print(open('/proc/self/cgroup').read()"
                               ".replace(chr(10), ' '))"], master_port=29561,
                         on_line=lambda rank, _, line: seen.setdefault(rank, line))
        assert rc == 0
    assert f"gradsync/{lab.hosts[0].ns}" in seen[0] and "gradsync/" not in seen[1]
    assert not group.exists()
