"""Tests for gradsync.lab: rates, clean-up on every path, shaped links, collectives in a lab.

The tests that build namespaces need root and a kernel that allows `ip netns add`; they skip
otherwise (CI runs as root). Each checks that `ip netns list` and `ip link` are the same
after it as before. Transfers use tests/_lab_transfer.py; the collectives' busbw against the
link is checked through `gradsync bench collectives --lab` in tests/test_bench.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradsync.lab import (LabError, down, format_rate, lab_launch, netns, parse_rate,
                          run_command, status, train_in_lab, up)
from tests.distributed import scaled
from tests.helpers import needs_netns

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.getenv("PYTHONPATH")]))}
LINK_200 = 200e6 / 8  # bytes/s of a 200 Mbit/s link
LINK_50 = 50e6 / 8


@pytest.fixture(autouse=True)
def lab_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GRADSYNC_LAB_DIR", str(tmp_path / "labs"))
    return tmp_path / "labs"


def _snapshot() -> tuple[list[str], list[str]]:
    links = [line.split(":")[1].strip() for line in netns.ip("-o", "link").splitlines()]
    return sorted(netns.list_netns()), sorted(links)


@pytest.fixture
def leaves_nothing(lab_dir: Path):
    """Fail the test if a namespace, link or state file it created outlives it."""
    before = _snapshot()
    yield
    assert _snapshot() == before
    assert not list(lab_dir.glob("*.json"))


def _transfer(lab, src: int, dst: int, nbytes: int, port: int = 5001) -> float:
    """Bytes/s of one TCP transfer from host ``src`` to host ``dst``."""
    addr = lab.hosts[dst].addr
    env = {**os.environ, **ENV}
    recv = subprocess.Popen(lab.exec_argv(dst, [PY, "-m", "tests._lab_transfer", "recv", addr,
                                                str(port), str(nbytes)]),
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert recv.stdout.readline().strip() == "ready"
        subprocess.run(lab.exec_argv(src, [PY, "-m", "tests._lab_transfer", "send", addr,
                                           str(port), str(nbytes)]), check=True, env=env,
                       timeout=scaled(30))
        result = json.loads(recv.stdout.readline())
    finally:
        recv.kill()
        recv.wait()
    assert result["bytes"] == nbytes
    return nbytes / result["seconds"]


# ---------------------------------------------------------------- no root needed

@pytest.mark.timeout(10)
@pytest.mark.parametrize("text,bits", [
    ("1gbit", 10**9), ("250mbit", 250 * 10**6), ("100kbit", 10**5), ("1.5Gbit", 15 * 10**8),
    ("12mbps", 96 * 10**6), ("1000000", 10**6), ("64kibit", 65536), ("2mibps", 16 * 2**20),
    (" 200mbit ", 200 * 10**6), ("8000bit", 8000),
])
def test_parse_rate(text: str, bits: int) -> None:
    assert parse_rate(text) == bits


@pytest.mark.timeout(10)
@pytest.mark.parametrize("text", ["", "fast", "1gb", "mbit", "-5mbit", "1e9", "1 g bit",
                                  "0", "1bit", "200gbit"])
def test_bad_rate_is_one_clear_line(text: str) -> None:
    with pytest.raises(LabError) as info:
        parse_rate(text)
    assert "\n" not in str(info.value) and "rate" in str(info.value)


@pytest.mark.timeout(10)
def test_format_rate_round_trips() -> None:
    for bits in (10**9, 250 * 10**6, 100_000, 8500, 65536):
        assert parse_rate(format_rate(bits)) == bits
    assert format_rate(200 * 10**6) == "200mbit"


@pytest.mark.timeout(10)
def test_not_root_or_no_iproute2_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="needs root"):
        up(2)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None)
    with pytest.raises(LabError, match=r"needs the ip and tc commands \(package iproute2\)"):
        up(2)


@pytest.mark.timeout(10)
def test_bad_arguments() -> None:
    with pytest.raises(LabError, match="one per host"):
        up(3, rates=["1gbit", "1gbit"])
    with pytest.raises(LabError, match="between 1 and"):
        up(0)
    with pytest.raises(LabError, match="bad lab name"):
        up(2, name="no/slash")


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`gradsync lab ARGS` through a minimal driver, as gradsync/cli.py will wire it."""
    driver = ("import argparse, sys; from gradsync.lab import cli; "
              "p = argparse.ArgumentParser(prog='gradsync'); "
              "cli.add_parser(p.add_subparsers(dest='command')); "
              "sys.exit(cli.main(p.parse_args(sys.argv[1:])))")
    return subprocess.run([PY, "-c", driver, "lab", *args], capture_output=True, text=True,
                          timeout=scaled(timeout), env={**os.environ, **ENV}, check=False)


@pytest.mark.timeout(30)
def test_cli_bad_rate_exits_2_with_one_line() -> None:
    proc = _cli("up", "--hosts", "2", "--rate", "fast")
    assert proc.returncode == 2
    assert proc.stderr.startswith("gradsync: error: cannot parse rate 'fast'")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- namespaces

@needs_netns
@pytest.mark.timeout(30)
def test_up_status_down_leaves_nothing(leaves_nothing) -> None:
    lab = up(3, "1gbit", rates=["1gbit", "1gbit", "250mbit"], name="t-basic")
    try:
        assert lab.alive() and lab.world_size == 3
        [listed] = status()
        assert listed.name == "t-basic"
        assert [h.addr for h in listed.hosts] == [f"{lab.subnet[:-4]}{i}" for i in (1, 2, 3)]
        assert [format_rate(h.rate) for h in listed.hosts] == ["1gbit", "1gbit", "250mbit"]
        for h in lab.hosts:  # shaped both ways, names within IFNAMSIZ
            assert "tbf" in netns.tc("qdisc", "show", "dev", h.ifname, ns=h.ns)
            assert "tbf" in netns.tc("qdisc", "show", "dev", h.port, ns=lab.switch_ns)
            assert len(h.ifname) <= 15 and len(h.port) <= 15
        with pytest.raises(LabError, match="already up"):
            up(2, name="t-basic")
    finally:
        assert down("t-basic")
    assert not down("t-basic")  # idempotent
    assert status() == []


def _cli_in_process(capfd: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    import argparse

    from gradsync.lab import cli

    parser = argparse.ArgumentParser(prog="gradsync")
    cli.add_parser(parser.add_subparsers(dest="command"))
    rc = cli.main(parser.parse_args(["lab", *args]))
    out, err = capfd.readouterr()
    return rc, out, err


@needs_netns
@pytest.mark.timeout(60)
def test_cli_up_run_status_down(capfd: pytest.CaptureFixture, leaves_nothing) -> None:
    assert _cli_in_process(capfd, "up", "--hosts", "2", "--rate", "100mbit",
                           "--name", "t-cli")[0] == 0
    try:
        rc, _, err = _cli_in_process(capfd, "up", "--hosts", "2", "--name", "t-cli")
        assert rc == 2 and err.startswith("gradsync: error: a lab named 't-cli' is already up")
        show = _cli_in_process(capfd, "status")[1]
        assert "t-cli" in show and "100mbit" in show
        code = "import os; print(os.environ['RANK'], os.environ['MASTER_ADDR'])"
        rc, out, err = _cli_in_process(capfd, "run", "--name", "t-cli", "--", PY, "-c", code)
        assert rc == 0, err
        master = status()[0].master_addr
        assert sorted(out.splitlines()) == [f"[rank {r}] {r} {master}" for r in (0, 1)]
        # Only rank 0 fails: were both to exit 5, which one is named would be a race.
        fail = "import os, sys; sys.exit(5 if os.environ['RANK'] == '0' else 0)"
        rc, _, err = _cli_in_process(capfd, "run", "--name", "t-cli", "--", PY, "-c", fail)
        assert rc == 5 and "rank 0 exited with code 5" in err, err
    finally:
        assert _cli_in_process(capfd, "down", "--name", "t-cli")[0] == 0
    assert _cli_in_process(capfd, "down", "--name", "t-cli")[0] == 0  # gone: not an error
    assert _cli_in_process(capfd, "status")[1].strip() == "no lab is up"


@needs_netns
@pytest.mark.timeout(60)
def test_every_slot_runs_in_its_host(leaves_nothing) -> None:
    """Ranks are host-major; each sees its host's interface and its own network namespace."""
    code = ("import json, os, socket; e = os.environ; "
            "print(json.dumps({k: e[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', "
            "'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'GLOO_SOCKET_IFNAME')} | "
            "{'if': socket.if_nametoindex(e['GLOO_SOCKET_IFNAME']), "
            "'netns': os.readlink('/proc/self/ns/net')}))")
    lines: dict[int, dict] = {}
    with up(2, "1gbit", procs_per_host=2) as lab:
        rc = run_command(lab, [PY, "-c", code], master_port=29555,
                         on_line=lambda rank, _, line: lines.setdefault(rank, json.loads(line)))
        assert rc == 0
    assert sorted(lines) == [0, 1, 2, 3]
    for rank, e in lines.items():
        host = lab.hosts[rank // 2]
        assert e["RANK"] == str(rank) and e["WORLD_SIZE"] == "4"
        assert e["LOCAL_RANK"] == str(rank % 2) and e["LOCAL_WORLD_SIZE"] == "2"
        assert e["MASTER_ADDR"] == lab.hosts[0].addr and e["MASTER_PORT"] == "29555"
        assert e["GLOO_SOCKET_IFNAME"] == host.ifname
    assert lines[0]["netns"] == lines[1]["netns"] != lines[2]["netns"] == lines[3]["netns"]


@needs_netns
@pytest.mark.timeout(60)
def test_failing_rank_stops_the_others_and_the_lab_goes(leaves_nothing) -> None:
    # The others would sleep for an hour: returning at all shows they were stopped.
    code = ("import os, sys, time; r = int(os.environ['RANK']); "
            "sys.exit(3) if r == 1 else time.sleep(3600)")
    with up(3, "1gbit") as lab:
        start = time.monotonic()
        assert run_command(lab, [PY, "-c", code], grace_s=0.5) == 3
        assert time.monotonic() - start < scaled(30)
        for ns in lab.namespaces():
            assert netns.netns_pids(ns) == []
        assert lab_launch(lab, [], module="tests.no_such_module", env=ENV) != 0
        assert run_command(lab, [PY, "-c", "import time; time.sleep(60)"], timeout_s=1) == 124


@needs_netns
@pytest.mark.timeout(30)
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_inside_with_removes_the_lab(exc: type[BaseException], leaves_nothing) -> None:
    with pytest.raises(exc), up(2, "1gbit") as lab:
        assert lab.alive()
        raise exc("mid-way")


@needs_netns
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_interrupted_run_removes_the_lab(sig: signal.Signals, lab_dir: Path,
                                         leaves_nothing) -> None:
    """Ctrl-C / SIGTERM to a process running ranks in a lab: ranks stopped, lab gone."""
    driver = ("import sys; from gradsync.lab import run_command, up\n"
              "with up(2, '1gbit') as lab:\n"
              "    sys.exit(run_command(lab, [sys.executable, '-c', 'import time; "
              "print(\"ready\", flush=True); time.sleep(60)'], grace_s=1))")
    proc = subprocess.Popen([PY, "-c", driver], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV})
    try:
        ready = [proc.stdout.readline() for _ in range(2)]
        assert sorted(ready) == ["[rank 0] ready\n", "[rank 1] ready\n"]
        proc.send_signal(sig)
        assert proc.wait(timeout=scaled(30)) == 128 + sig
    finally:
        proc.kill()
        proc.wait()


@needs_netns
@pytest.mark.timeout(30)
def test_failed_creation_rolls_back(monkeypatch: pytest.MonkeyPatch, leaves_nothing) -> None:
    real_shape, calls = netns.shape, []

    def shape_then_fail(ns: str, dev: str, rate: int) -> None:
        calls.append(dev)
        if len(calls) == 4:  # half-way through host 1
            raise LabError("injected failure")
        real_shape(ns, dev, rate)

    monkeypatch.setattr(netns, "shape", shape_then_fail)
    with pytest.raises(LabError, match="injected"):
        up(3, "1gbit", name="t-half")
    assert status() == []


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_links_are_shaped_to_their_rate(leaves_nothing) -> None:
    """8 MB between two 200 Mbit/s hosts, and into and out of a host at 50 Mbit/s.

    No transfer beats its link: goodput tops out at about 0.95 of the rate (tbf counts
    Ethernet frames, 1514 bytes on the wire for 1448 bytes of TCP payload), plus tbf's
    128 KiB burst. How close a transfer comes to its link depends on the machine's load, so
    the speeds are only compared: the 50 Mbit/s link, about 4x slower on a quiet machine,
    must be clearly slower both ways. The figures are printed (``pytest -rP``) for the target
    in docs/benchmarks.md.
    """
    with up(3, rates=["200mbit", "200mbit", "50mbit"]) as lab:
        for h, rate in zip(lab.hosts, ["200Mbit", "200Mbit", "50Mbit"]):
            for dev, ns in ((h.ifname, h.ns), (h.port, lab.switch_ns)):
                assert f" rate {rate} " in netns.tc("qdisc", "show", "dev", dev, ns=ns)
        fast = _transfer(lab, 0, 1, 8_000_000)
        slow_in = _transfer(lab, 0, 2, 8_000_000)   # limited at the switch's port to host 2
        slow_out = _transfer(lab, 2, 1, 8_000_000)  # limited at host 2's own interface
    print(f"200 Mbit/s link: {fast / LINK_200:.3f} of the rate; 50 Mbit/s link: "
          f"{slow_in / LINK_50:.3f} in, {slow_out / LINK_50:.3f} out; fast/slow "
          f"{fast / slow_in:.2f} in, {fast / slow_out:.2f} out")
    assert fast <= 1.1 * LINK_200, f"{fast * 8 / 1e6:.1f} Mbit/s"
    for slow in (slow_in, slow_out):
        assert slow <= 1.1 * LINK_50, f"{slow * 8 / 1e6:.1f} Mbit/s"
        assert fast / slow >= 2, f"fast/slow = {fast / slow:.2f}"


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_train_in_lab(leaves_nothing) -> None:
    rc = train_in_lab(2, "1gbit", None, ["--steps", "3", "--no-progress"], ENV)
    assert rc == 0
