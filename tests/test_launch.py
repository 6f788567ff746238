"""Tests for gradsync.launcher: exit codes, root-cause ranks, no process left behind.

The workers are tests/_launch_worker.py; see its docstring for the modes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import gradsync.launcher.supervise
from gradsync.launcher import (LaunchError, LaunchResult, check_port_free, find_free_port,
                               launch)
from tests.distributed import scaled
from tests.helpers import children

REPO = Path(__file__).resolve().parent.parent
WORKER = "tests._launch_worker"
# `python -m tests._launch_worker` must find this checkout whatever pytest's cwd is.
WORKER_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.getenv("PYTHONPATH")]))}


@pytest.fixture(autouse=True)
def fast_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorter waits than a real job needs, so the failure tests take well under a second."""
    monkeypatch.setattr(gradsync.launcher.supervise, "_ROOT_CAUSE_WINDOW_S", 0.2)
    monkeypatch.setattr(gradsync.launcher.supervise, "_TERM_WAIT_S", 0.5)


def wait_until(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def is_dead(pid: int) -> bool:
    """True if ``pid`` is gone or a zombie (dead, waiting for a parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def pids(out: Path, prefix: str) -> dict[int, int]:
    """Rank -> pid from the ``prefix.RANK`` files the workers wrote."""
    found = {}
    for path in out.glob(f"{prefix}.*"):
        if not path.name.endswith(".tmp"):
            found[int(path.name.split(".")[1])] = int(path.read_text())
    return found


def assert_all_dead(out: Path, nprocs: int) -> None:
    workers = pids(out, "pid")
    assert sorted(workers) == list(range(nprocs))
    # launch() reaps its workers before returning, so they must be gone already.
    assert all(is_dead(pid) for pid in workers.values()), workers
    # Grandchildren were SIGKILLed; the kernel may need a moment to finish them off.
    for pid in pids(out, "gpid").values():
        wait_until(lambda: is_dead(pid), what=f"grandchild {pid} to die")


def run(mode: str, out: Path, nprocs: int, k: int = 0, grace_s: float = 0.5) -> LaunchResult:
    return launch([mode, str(out), str(k)], nprocs, module=WORKER, env=WORKER_ENV, grace_s=grace_s)


@pytest.mark.timeout(60)
def test_all_workers_succeed(tmp_path: Path) -> None:
    assert run("ok", tmp_path, 3) == LaunchResult(0, None, None)
    assert_all_dead(tmp_path, 3)


@pytest.mark.timeout(60)
def test_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    port = find_free_port()
    env = {**WORKER_ENV, "GRADSYNC_TEST_EXTRA": "x", "RANK": "99"}
    result = launch(["ok", str(tmp_path), "0"], 2, master_port=port, env=env, module=WORKER)
    assert result.returncode == 0
    for rank in range(2):
        seen = json.loads((tmp_path / f"env.{rank}.json").read_text())
        assert seen == {
            "RANK": str(rank),  # the launcher's value wins over the caller's env
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "GRADSYNC_LAUNCHED": "1",
            "GLOO_SOCKET_IFNAME": "lo",
            "GRADSYNC_TEST_EXTRA": "x",
        }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("zygote", ["1", "0"])
def test_ranks_are_forked_from_a_zygote_unless_asked_not_to(tmp_path: Path, zygote: str) -> None:
    """By default the ranks are forked from one process that imported the module (zygote.py)
    and are still this process's children, each in its own session, named by rank;
    GRADSYNC_ZYGOTE=0 executes each afresh. Either way the zygote is gone afterwards."""
    env = {**WORKER_ENV, "GRADSYNC_ZYGOTE": zygote}
    assert launch(["ok", str(tmp_path), "0"], 2, env=env, module=WORKER).returncode == 0
    for rank in range(2):
        seen = json.loads((tmp_path / f"proc.{rank}.json").read_text())
        pid = int((tmp_path / f"pid.{rank}").read_text())
        assert seen["ppid"] == os.getpid() and seen["sid"] == pid, seen
        assert seen["argv0"].endswith("_launch_worker.py"), seen
        assert (seen["comm"] == f"gradsync r{rank}") == (zygote == "1"), seen
    left = [pid for pid in children(os.getpid())
            if b"gradsync.launcher.zygote import" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert not left, left


@pytest.mark.timeout(60)
def test_user_gloo_interface_is_kept(tmp_path: Path) -> None:
    env = {**WORKER_ENV, "GLOO_SOCKET_IFNAME": "eth7"}
    assert launch(["ok", str(tmp_path), "0"], 1, env=env, module=WORKER).returncode == 0
    assert json.loads((tmp_path / "env.0.json").read_text())["GLOO_SOCKET_IFNAME"] == "eth7"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("k", [0, 2])
def test_exit_code_names_rank_and_stops_blocked_peers(tmp_path: Path, k: int) -> None:
    result = run("exit", tmp_path, 3, k=k)
    assert result == LaunchResult(3, k, "exited with code 3")
    assert len(pids(tmp_path, "gpid")) == 2  # the blocked peers' grandchildren
    assert_all_dead(tmp_path, 3)


@pytest.mark.timeout(60)
def test_sigkilled_rank_is_named(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    result = run("sigkill", tmp_path, 3, k=1)
    assert result == LaunchResult(128 + signal.SIGKILL, 1, "killed by SIGKILL")
    assert "gradsync: worker rank 1 killed by SIGKILL; stopping the other workers" in (
        capfd.readouterr().err
    )
    assert_all_dead(tmp_path, 3)


@pytest.mark.timeout(60)
def test_signalled_rank_beats_earlier_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rank 0 exits 1 first, rank 3 is SIGKILLed right after: rank 3 is the root cause. The
    # exit-code rank has the lower rank, so rank order alone would name the wrong one.
    # A wide window keeps a loaded machine from flaking; it closes as soon as rank 3 dies.
    monkeypatch.setattr(gradsync.launcher.supervise, "_ROOT_CAUSE_WINDOW_S", scaled(30.0))
    result = run("fail_then_sigkill", tmp_path, 4, k=3)
    assert result == LaunchResult(128 + signal.SIGKILL, 3, "killed by SIGKILL")
    assert_all_dead(tmp_path, 4)


@pytest.mark.timeout(60)
def test_workers_ignoring_sigterm_are_killed(tmp_path: Path) -> None:
    result = run("ignore_term", tmp_path, 3, k=0, grace_s=0.1)
    assert result == LaunchResult(3, 0, "exited with code 3")
    assert_all_dead(tmp_path, 3)


@pytest.mark.timeout(60)
def test_grandchild_of_successful_worker_is_killed(tmp_path: Path) -> None:
    assert run("grandchild", tmp_path, 2, k=1).returncode == 0
    assert list(pids(tmp_path, "gpid")) == [1]
    assert_all_dead(tmp_path, 2)


def start_launcher(out: Path, nprocs: int) -> subprocess.Popen[bytes]:
    """Run launch() in its own process so that the test can signal or kill it."""
    code = (
        "import sys\n"
        "from gradsync.launcher import launch\n"
        f"r = launch(['block', {str(out)!r}, '0'], {nprocs}, module={WORKER!r},"
        " grace_s=10.0)\n"
        "sys.exit(r.returncode)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **WORKER_ENV})
    wait_until(lambda: len(list(out.glob("ready.[0-9]"))) == nprocs, what="workers ready")
    return launcher


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_launcher_signal_is_forwarded(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    launcher = start_launcher(tmp_path, 2)
    try:
        launcher.send_signal(sig)
        assert launcher.wait(timeout=scaled(30)) == code
    finally:
        launcher.kill()
    for rank in range(2):
        assert (tmp_path / f"sig.{rank}").read_text() == sig.name
    assert_all_dead(tmp_path, 2)


@pytest.mark.timeout(60)
def test_workers_die_with_sigkilled_launcher(tmp_path: Path) -> None:
    launcher = start_launcher(tmp_path, 2)
    launcher.kill()
    launcher.wait(timeout=scaled(30))
    for pid in pids(tmp_path, "pid").values():  # PR_SET_PDEATHSIG at work
        wait_until(lambda: is_dead(pid), what=f"worker {pid} to die")


@pytest.mark.timeout(60)
def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        expected = f"port {port} on 127.0.0.1 is already in use; choose another with --port"
        with pytest.raises(LaunchError, match=expected):
            check_port_free("127.0.0.1", port)
        with pytest.raises(LaunchError, match=expected):
            launch(["ok", str(tmp_path), "0"], 2, master_port=port, module=WORKER)
    assert not list(tmp_path.iterdir())  # no worker was started
    check_port_free("127.0.0.1", port)  # free again once the listener closed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("nprocs", [0, -1])
def test_bad_nprocs(nprocs: int) -> None:
    with pytest.raises(LaunchError, match="nprocs"):
        launch(["ok"], nprocs)


@pytest.mark.timeout(60)
def test_find_free_port_is_bindable() -> None:
    port = find_free_port()
    assert 1 <= port <= 65535
    check_port_free("127.0.0.1", port)
