"""`gradsync run`: a user's script on several processes with torchrun's flags and variables,
supervised (a failed rank named, the others stopped, nothing left), per-rank logs, restarts
of the group, and several nodes. The examples under it: tests/test_examples.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gradsync.launcher.launch import worker_env
from gradsync.run.cli import normalize_argv
from gradsync.run.logs import RankLogs
from tests.distributed import free_port, scaled
from tests.helpers import ENV, REPO, alive, gradsync, in_process, one_line_error

PROBE = str(REPO / "tests" / "scripts" / "run_probe.py")


def test_torchruns_underscore_flags_are_read_up_to_the_script():
    argv = ["run", "--nproc_per_node", "2", "--master_port=29501", "--elastic", "t.py",
            "--my_flag", "1"]
    assert normalize_argv(argv) == ["run", "--nproc-per-node", "2", "--master-port=29501",
                                    "--elastic", "t.py", "--my_flag", "1"]
    assert normalize_argv(["train", "--x_y"]) == ["train", "--x_y"]


@pytest.mark.parametrize("args, needle", [
    (["--nnodes", "2", "--node-rank", "2", "t.py"], "--node-rank must be in 0 .. 1"),
    (["--redirects", "3", "t.py"], "--redirects needs --log-dir"),
    (["--min-workers", "2", "t.py"], "--min-workers needs --elastic"),
    (["--elastic", "--nnodes", "2", "t.py"], "takes no --nnodes"),
    (["--elastic", "--nproc-per-node", "2", "--min-workers", "3", "t.py"], "more than"),
    (["--master-port", "70000", "t.py"], "--master-port must be between 1 and 65535"),
    (["--lab", "2", "--nnodes", "2", "t.py"], "does not take --nnodes"),
    (["--rates", "1gbit", "t.py"], "need --lab"),
    (["--lab", "2", "--rates", "1gbit", "t.py"], "--rates lists 1 rates for 2 hosts"),
    (["no-such-script.py"], "no script no-such-script.py"),
    (["-m", "--no-python", "x"], "-m and --no-python"),
])
def test_bad_input_is_one_line(capfd, args, needle):
    one_line_error(in_process(capfd, "run", *args), needle)


def test_every_rank_gets_torchruns_variables():
    env = worker_env(5, 8, "10.0.0.1", 29500, {"X": "1"}, local_rank=1, local_world_size=4,
                     node_rank=1, nnodes=2, restart=2, max_restarts=3)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "MASTER_ADDR",
                                "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
                                "TORCHELASTIC_MAX_RESTARTS", "X")} == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "ROLE_RANK": "5",
        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": "2",
        "TORCHELASTIC_MAX_RESTARTS": "3", "X": "1"}
    # A job on loopback keeps gloo's sockets on lo (unless the user chose an interface).
    if "GLOO_SOCKET_IFNAME" not in ENV:
        assert worker_env(0, 1, "127.0.0.1", 1)["GLOO_SOCKET_IFNAME"] == "lo"
        assert "GLOO_SOCKET_IFNAME" not in worker_env(0, 1, "10.0.0.1", 1)


def test_rank_logs_route_streams_and_refuse_a_planted_link(tmp_path, capfd):
    logs = RankLogs(str(tmp_path / "logs"), [2, 3], redirects=1, tee=3)
    logs.on_line(0, "stdout", "out of rank 2")   # supervisor index 0 is rank 2
    logs.on_line(1, "stderr", "err of rank 3")
    logs.restarted(1)
    logs.on_line(0, "stdout", "again")
    logs.close()
    out, err = capfd.readouterr()
    assert out == "" and err == "[rank 3] err of rank 3\n"  # stdout redirected, stderr tee'd
    assert (tmp_path / "logs/rank-2/stdout.log").read_text() == \
        "out of rank 2\n[gradsync run: restart 1]\nagain\n"
    assert (tmp_path / "logs/rank-3/stderr.log").read_text().startswith("err of rank 3\n")
    target = tmp_path / "precious"
    target.write_text("keep")
    (tmp_path / "trap/rank-0").mkdir(parents=True)
    (tmp_path / "trap/rank-0/stdout.log").symlink_to(target)
    with pytest.raises(ValueError, match="cannot write the log .*stdout.log"):
        RankLogs(str(tmp_path / "trap"), [0])
    assert target.read_text() == "keep"


def _reports(out, n):
    return [json.loads((out / f"env-{r}.json").read_text()) for r in range(n)]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_failed_rank_is_named_the_others_stopped_and_the_group_restarted(tmp_path):
    """One run without restarts (rank 1 fails, ranks 0 and 2 wait forever: the launcher
    stops them) and one with --max-restarts 1 and --log-dir (the second attempt succeeds)."""
    failed = gradsync("run", "--nproc-per-node", "3", PROBE, str(tmp_path), "--fail-rank", "1",
                      "--code", "7", timeout=60)
    assert failed.returncode == 7, failed.stderr
    assert "gradsync: run failed: worker rank 1 exited with code 7" in failed.stderr
    assert "Traceback" not in failed.stderr
    first = _reports(tmp_path, 3)
    assert not [r["pid"] for r in first if alive(r["pid"])], "processes left behind"
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"],
             r["GROUP_RANK"], r["TORCHELASTIC_RESTART_COUNT"]) for r in first] == \
        [(str(r), str(r), "3", "3", "0", "0") for r in range(3)]

    logs = tmp_path / "logs"
    restarted = gradsync("run", "--nproc-per-node", "3", "--max-restarts", "1", "--log-dir",
                         str(logs), "--redirects", "1", PROBE, str(tmp_path), "--fail-rank",
                         "1", timeout=60)
    assert restarted.returncode == 0, restarted.stderr
    assert "restarting every worker (restart 1 of 1)" in restarted.stderr
    assert "probe rank" not in restarted.stdout  # stdout went to the files only
    assert "[rank 1] probe rank 1 fails" in restarted.stderr  # stderr tee'd, prefixed
    assert [r["TORCHELASTIC_RESTART_COUNT"] for r in _reports(tmp_path, 3)] == ["1"] * 3
    assert (logs / "rank-1/stdout.log").read_text() == \
        "probe rank 1 restart 0\n[gradsync run: restart 1]\nprobe rank 1 restart 1\n"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_nodes_form_one_group(tmp_path):
    """`--nnodes 2` on two launchers (here both on this machine): ranks 0-1 on node 0,
    2-3 on node 1, one group: the all-reduce of the ranks is 6 everywhere."""
    port = str(free_port())
    common = ["run", "--nnodes", "2", "--nproc-per-node", "2", "--master-port", port]
    node1 = subprocess.Popen([sys.executable, "-m", "gradsync", *common, "--node-rank", "1",
                              PROBE, str(tmp_path), "--collective"], env=ENV, cwd=REPO,
                             stderr=subprocess.PIPE, text=True)
    try:
        node0 = gradsync(*common, "--node-rank", "0", PROBE, str(tmp_path), "--collective",
                         timeout=90)
        _, err1 = node1.communicate(timeout=scaled(90))
    finally:
        if node1.poll() is None:
            node1.kill()
    assert node0.returncode == 0 and node1.returncode == 0, (node0.stderr, err1)
    reports = _reports(tmp_path, 4)
    assert [r["sum"] for r in reports] == [6] * 4
    assert [(r["LOCAL_RANK"], r["GROUP_RANK"], r["WORLD_SIZE"]) for r in reports] == \
        [("0", "0", "4"), ("1", "0", "4"), ("0", "1", "4"), ("1", "1", "4")]


# --- horovodrun's flags (gradsync/run/horovodrun.py) -------------------------------------------

def _resolved(tmp_path, *argv: str):
    """The RunConfig `gradsync run ARGV t.py` would run, parsed here (no worker starts)."""
    import argparse

    from gradsync.flags import dataclass_from_args
    from gradsync.run.cli import add_parser
    from gradsync.run.config import RunConfig
    from gradsync.run.horovodrun import resolve

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(normalize_argv(["run", *argv, str(tmp_path / "t.py"), "-np"]))
    assert args.script_args == ["-np"]  # the script's own flags are left alone
    return resolve(dataclass_from_args(RunConfig, args))


def test_horovodruns_flags_map_onto_the_launchers(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# one host\nlocalhost slots=3\n")
    cases = {
        ("-np", "4"): (4, None, None, False, None),
        ("-np", "2", "-H", "localhost:4"): (2, None, None, False, None),
        ("-H", "127.0.0.1:4",): (4, None, None, False, None),
        ("--hostfile", str(hostfile)): (3, None, None, False, None),
        ("-H", "h0:2,h1:2,h2:2"): (1, 3, 2, False, None),
        ("-np", "3", "--min-np", "2", "--max-np", "3"): (3, None, None, True, 2),
    }
    for argv, want in cases.items():
        c = _resolved(tmp_path, *argv)
        assert (c.nproc_per_node, c.lab.hosts, c.lab.procs_per_host, c.elastic.elastic,
                c.elastic.min_workers) == want, argv
    lab = _resolved(tmp_path, "-H", "h1:2,h0:2")
    assert lab.world_size == 4 and lab.procs_per_host == 2
    assert _resolved(tmp_path, "--timeline-filename", "t.json").timeline == "t.json"
    assert _resolved(tmp_path, "--nproc-per-node", "2") == _resolved(tmp_path, "-np", "2")


@pytest.mark.parametrize("args, needle", [
    (["-H", "gpu1:4,gpu2:4", "t.py"], "not over ssh on gpu1, gpu2"),
    (["-np", "5", "-H", "localhost:4", "t.py"], "-np 5 is more than the 4 slots"),
    (["-np", "2", "--min-np", "1", "--max-np", "4", "t.py"], "does not add more"),
    (["-np", "2", "--max-np", "1", "t.py"], "--max-np 1 is less than -np 2"),
    (["-np", "2", "--nproc-per-node", "3", "t.py"], "pass one of them"),
    (["-H", "h0:2,h1:1", "t.py"], "same number of ranks on every host"),
    (["-H", "h0:2,h2:2", "t.py"], "a lab of 2 hosts is h0..h1"),
    (["-H", "localhost:x", "t.py"], "is not HOST:SLOTS"),
    (["--hostfile", "/no/such/hosts", "t.py"], "--hostfile /no/such/hosts"),
    (["-H", "localhost:2", "--hostfile", "h", "t.py"], "either -H or --hostfile"),
    (["-H", "h0:1,h1:1", "--min-np", "1", "t.py"], "--elastic takes no --nnodes or --lab"),
    (["--timeline", "a.json", "--timeline-filename", "b.json", "t.py"], "not both"),
    (["-np", "2", "--min-np", "1", "--timeline", "a.json", "t.py"], "not built for --elastic"),
])
def test_bad_horovodrun_flags_are_one_line(capfd, tmp_path, args, needle):
    (tmp_path / "t.py").write_text("")
    one_line_error(in_process(capfd, "run", *args[:-1], str(tmp_path / "t.py")), needle)
