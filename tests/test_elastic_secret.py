"""An elastic job's store is its user's alone (issue 22, item 9).

Another local user once connected to the job's TCPStore, read the membership and set
``elastic/stop``: every worker stopped, exit 3, nothing printed. The store is now a file in
a directory only the job's user can enter, and a stop the launcher did not write is named
on the launcher's last line.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch.distributed as dist

from gradsync.comm.coordinator import Coordinator
from gradsync.comm.elastic import STATE, STOP
from gradsync.comm.engine import TORCH
from gradsync.launcher.elastic import run_elastic
from tests.distributed import scaled

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534

LAUNCH = """\
import sys
from gradsync.train.elastic_run import launch
sys.exit(launch([sys.executable, "-m", "tests._elastic_worker", sys.argv[1], sys.argv[2],
                 "batch"], 2, min_workers=2, timeout_s=float(sys.argv[3])))
"""


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                if "=" in item)


def _a_worker(marker: str, launcher: subprocess.Popen, timeout_s: float) -> dict[str, str]:
    """The environment of a worker of the job (its processes carry ``marker``), as soon as
    one exists: the store does by then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and launcher.poll() is None:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                env = _environ(int(proc.name))
            except OSError:
                continue
            if env.get("GRADSYNC_TEST_MARK") == marker and "GRADSYNC_ELASTIC_UID" in env:
                return env
        time.sleep(0.01)  # polls for the worker to exist, no settling time
    raise AssertionError(f"no worker appeared: {launcher.poll()}")


def _listening_ports(pid: int) -> list[int]:
    """The TCP ports process ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _intrude(env: dict[str, str]) -> dict[str, str]:
    """As another user (uid 65534, in a forked child), try to read the membership and set
    the stop key through whatever the worker's environment names: the store's port (how the
    job was reached before) and the store's file. Returns what each try gave."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, try, report, leave without any cleanup
        out: dict[str, str] = {}
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            if "MASTER_PORT" in env:
                try:
                    store = dist.TCPStore(env.get("MASTER_ADDR", "127.0.0.1"),
                                          int(env["MASTER_PORT"]), None, False,
                                          timeout=datetime.timedelta(seconds=1))
                    out["tcp read"] = store.get(STATE).decode()
                    store.set(STOP, "0 2")
                    out["tcp stop"] = "set"
                except Exception as exc:  # noqa: BLE001 - what the intruder got is the result
                    out.setdefault("tcp read", f"refused: {type(exc).__name__}")
            if "GRADSYNC_ELASTIC_STORE" in env:
                path = env["GRADSYNC_ELASTIC_STORE"]
                try:
                    out["file read"] = Path(path).read_bytes().decode(errors="replace")
                except OSError as exc:
                    out["file read"] = f"refused: {type(exc).__name__}"
                try:
                    dist.FileStore(path, -1).set(STOP, "0 2")
                    out["file stop"] = "set"
                except Exception as exc:  # noqa: BLE001
                    out["file stop"] = f"refused: {type(exc).__name__}"
        finally:
            os.write(write_end, json.dumps(out).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(report)


@pytest.mark.timeout(90)
@pytest.mark.skipif(os.geteuid() != 0, reason="runs the intruder as another user: needs root")
def test_another_user_can_neither_read_nor_stop_an_elastic_job(tmp_path: Path):
    steps, marker = 150, uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
           os.getenv("PYTHONPATH")])), "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR",
           "TEST_COMM_TIMEOUT": str(scaled(30)), "GRADSYNC_TEST_MARK": marker}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCH, str(tmp_path), str(steps),
                                 str(scaled(30))], env=env, cwd=REPO, stderr=subprocess.PIPE,
                                text=True)
    try:
        worker_env = _a_worker(marker, launcher, scaled(30))
        ports = _listening_ports(launcher.pid)
        outcome = _intrude(worker_env)
        _, stderr = launcher.communicate(timeout=scaled(60))
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 0, (outcome, stderr)
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["step"], result["workers"], result["changes"]) == (steps, 2, []), outcome
    # Nothing to connect to, and the file refuses the other user (read and write alike).
    assert ports == [] and "MASTER_PORT" not in worker_env, (ports, worker_env)
    assert outcome == {"file read": "refused: PermissionError",
                       "file stop": "refused: DistStoreError"}, outcome
    assert "Traceback" not in stderr, stderr


@pytest.mark.timeout(30)
def test_a_stop_the_launcher_did_not_write_is_named(capfd):
    # Only the job's own user can open the store; a process of that user that sets the
    # stop key makes the workers exit 3, and the launcher says so on one line.
    coordinator = Coordinator.on_this_host(1, 1, scaled(10))
    try:
        TORCH.open_store(coordinator.path, scaled(10)).set(STOP, "0 2")
        result = run_elastic([sys.executable, "-c", "raise SystemExit(3)"],
                             lambda uid: {**os.environ, **coordinator.env()}, [0],
                             coordinator)
    finally:
        coordinator.close()
    assert result.returncode == 3
    assert ("gradsync: worker rank 0 exited with code 3; elastic/stop was set in the store by "
            "another process, not by this launcher ('0 2'): stopping the other workers"
            ) in capfd.readouterr().err
