"""A harness for elastic jobs across hosts: one `gradsync rdzv` and an agent per host
(`gradsync run --elastic --rdzv-endpoint`), each host either this machine's loopback or a
lab namespace, running tests/scripts/elastic_hosts.py. Shared by
tests/test_elastic_hosts.py and benchmarks/bench_elastic_hosts.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "tests" / "scripts" / "elastic_hosts.py")


def _tree(pid: int) -> list[int]:
    """``pid`` and every descendant of it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


class Job:
    """One job: ``start`` the service and the hosts, fail one, ``finish``.

    Args:
        out: a directory for the steps, results and logs.
        epochs, pause_s: the script's epochs and pause after each step.
        nnodes, min_workers: the service's flags.
        env: extra environment of every process.
        joiner: the script's JOINER (the run ends with the epoch in which a member with
            this id or a later one has joined), or None.
    """

    def __init__(self, out: Path, epochs: int, nnodes: str, min_workers: int = 1,
                 env: dict[str, str] | None = None, pause_s: float = 0.0,
                 joiner: int | None = None):
        self.out, self.epochs, self.nnodes, self.min_workers = out, epochs, nnodes, min_workers
        self.pause_s = pause_s
        self.script_args = [str(epochs), str(pause_s), *([] if joiner is None else [str(joiner)])]
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.service: subprocess.Popen | None = None
        self.hosts: list[subprocess.Popen] = []
        self.endpoint = ""

    def _spawn(self, name: str, argv: list[str], prefix: list[str]) -> subprocess.Popen:
        log = open(self.out / f"{name}.log", "w")
        return subprocess.Popen([*prefix, *argv], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.out)

    def start_service(self, addr: str, port: int, prefix: list[str] = ()) -> None:
        self.endpoint = f"{addr}:{port}"
        self.service = self._spawn("rdzv", [
            sys.executable, "-m", "gradsync", "rdzv", "--endpoint", self.endpoint,
            "--nnodes", self.nnodes, "--min-workers", str(self.min_workers),
            "--last-call", "1", "--out", str(self.out / "generations.json")], list(prefix))

    def start_host(self, nproc: int, prefix: list[str] = ()) -> subprocess.Popen:
        proc = self._spawn(f"host-{len(self.hosts)}", [
            sys.executable, "-m", "gradsync", "run", "--elastic", "--rdzv-endpoint",
            self.endpoint, "--nproc-per-node", str(nproc), SCRIPT, str(self.out),
            *self.script_args], list(prefix))
        self.hosts.append(proc)
        return proc

    def start_train_host(self, workers: int, args: list[str]) -> subprocess.Popen:
        """A host of `gradsync train --elastic --rdzv-endpoint` (a built-in workload)."""
        proc = self._spawn(f"host-{len(self.hosts)}", [
            sys.executable, "-m", "gradsync", "train", "--elastic", "--rdzv-endpoint",
            self.endpoint, "--workers", str(workers), "--no-progress", *args], [])
        self.hosts.append(proc)
        return proc

    def _agent_line(self, index: int) -> tuple[int, list[int]]:
        """Host ``index``'s node id and first member ids, from its agent's first line
        (``gradsync: host NODE (ADDR) trains workers [UIDS] of WORLD``)."""
        text = (self.out / f"host-{index}.log").read_text()
        found = re.search(r"gradsync: host (\d+) \(.*?\) trains workers \[([0-9, ]*)\]", text)
        assert found, text
        return int(found.group(1)), [int(u) for u in found.group(2).split(",")]

    def uids_of(self, index: int) -> list[int]:
        """The member ids host ``index`` was given."""
        return self._agent_line(index)[1]

    def hosts_of(self) -> dict[int, int]:
        """Each first-generation member's host (node) id."""
        lines = [self._agent_line(i) for i in range(len(self.hosts))]
        return {uid: node for node, uids in lines for uid in uids}

    def steps(self) -> dict[int, list[tuple[int, float]]]:
        """Each member's completed steps so far: uid -> [(step, time, workers)]."""
        found = {}
        for path in self.out.glob("steps-*"):
            lines = path.read_text().splitlines()[:-1]  # the last may be half-written
            found[int(path.name[6:])] = [(int(a), float(b), int(c)) for a, b, c in
                                         (line.split() for line in lines)]
        return found

    def wait_step(self, step: int, timeout_s: float) -> None:
        """Until some member has completed ``step``."""
        deadline = time.monotonic() + timeout_s
        while not any(s and s[-1][0] >= step for s in self.steps().values()):
            if time.monotonic() > deadline:
                raise AssertionError(f"no step {step} within {timeout_s} s: {self.logs()}")
            time.sleep(0.05)

    def next_step_after(self, t0: float, timeout_s: float, workers: int) -> float:
        """Seconds from ``t0`` to the first step completed after it by fewer than
        ``workers`` (a step in flight may still complete with the lost ones)."""
        deadline = time.monotonic() + timeout_s
        while True:
            after = [t for s in self.steps().values() for _, t, n in s
                     if t > t0 and n < workers]
            if after:
                return min(after) - t0
            if time.monotonic() > deadline:
                raise AssertionError(f"no step after the failure within {timeout_s} s: "
                                     f"{self.logs()}")
            time.sleep(0.02)

    def kill_host(self, index: int) -> float:
        """SIGKILL host ``index``'s agent and workers at once; returns when (time.time())."""
        pids = _tree(self.hosts[index].pid)
        t0 = time.time()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return t0

    def stop_worker(self, index: int) -> float:
        """SIGSTOP one worker of host ``index`` (the first child of its agent); returns when."""
        agent = self.hosts[index].pid
        worker = min(int(k) for task in Path(f"/proc/{agent}/task").iterdir()
                     for k in (task / "children").read_text().split())
        t0 = time.time()
        os.kill(worker, signal.SIGSTOP)
        return t0

    def finish(self, timeout_s: float) -> tuple[int, list[int]]:
        """Wait for the service and every host: (service's code, hosts' codes)."""
        deadline = time.monotonic() + timeout_s
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.hosts]
        assert self.service is not None
        return self.service.wait(timeout=max(1.0, deadline - time.monotonic())), codes

    def generations(self) -> list[dict]:
        return json.loads((self.out / "generations.json").read_text())["generations"]

    def results(self) -> dict[int, dict]:
        return {int(p.name[7:-5]): json.loads(p.read_text())
                for p in self.out.glob("result-*.json")}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}"
                         for p in sorted(self.out.glob("*.log")))

    def close(self) -> None:
        """Kill whatever is left (after a failed check)."""
        for proc in [*self.hosts, *([self.service] if self.service else [])]:
            for pid in _tree(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
