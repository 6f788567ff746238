"""SIGKILL trials: a writer process is killed at random moments of its checkpoint saves, 30
times, and the newest committed checkpoint must load with the right contents every time.

The trials print their outcome and the measured save time; show them with
``pytest tests/test_checkpoint_kills.py -rP``.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from gradsync.checkpoint import CheckpointManager

from ._checkpoint_writer import KEEP, make_model, meta_for
from .distributed import scaled
from .helpers import filled_with

WRITER = Path(__file__).with_name("_checkpoint_writer.py")


class _Writer:
    """Client of the fork server in _checkpoint_writer.py."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-u", str(WRITER)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.child: int | None = None
        self._pending = b""  # read from the pipe, not yet returned as lines

    def run(self, directory: Path, first: int, count: int) -> int:
        self.proc.stdin.write(f"run {directory} {first} {count}\n")
        self.proc.stdin.flush()
        kind, pid = self.line().split()
        assert kind == "child", kind
        self.child = int(pid)
        return self.child

    def line(self, timeout: float = scaled(30)) -> str:
        # Our own buffer on the raw descriptor: select() cannot see lines a file object
        # has already buffered.
        fd, deadline = self.proc.stdout.fileno(), time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            assert ready, f"no line from the writer in {timeout:.0f} s; child: {_state(self.child)}"
            chunk = os.read(fd, 65536)
            assert chunk, "the writer server died"
            self._pending += chunk
        raw, self._pending = self._pending.split(b"\n", 1)
        line = raw.decode()
        assert not line.startswith("error"), line
        return line.strip()

    def until_exit(self, pid: int) -> list[str]:
        lines = []
        while not (line := self.line()).startswith(f"exit {pid} "):
            lines.append(line)
        self.child = None
        return lines

    def close(self) -> None:
        if self.child is not None:  # a failed assertion left a writer running
            with contextlib.suppress(ProcessLookupError):  # reaped by the server already
                os.kill(self.child, signal.SIGKILL)
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=scaled(10))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _state(pid: int | None) -> str:
    """The kernel's view of a process, for a failure message: a SIGKILLed process that does
    not exit is in uninterruptible sleep (state D), and wchan says in what."""
    if pid is None:
        return "none"
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return f"pid {pid} state {stat} wchan {Path(f'/proc/{pid}/wchan').read_text()}"
    except OSError:
        return f"pid {pid} gone"


def kill_phase(directory: Path, step: int | None, latest: int | None) -> str:
    """Where a save of `step` (None: no save was running) was when the kill came."""
    if step is None:
        return "between saves"
    name = f"step-{step:08d}"
    if (directory / f"{name}.tmp").exists():  # also a stale one a new attempt reuses
        return "writing files"
    if latest == step:
        return "after the marker"
    if (directory / name).exists():
        return "renamed, before the marker"
    return "before the first file"


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_kill_during_checkpoint_writes(tmp_path: Path) -> None:
    """SIGKILL the writer at random moments spread over its saves, 30 times in one directory.

    Each trial resumes where the last one left off (from `latest() + 1`), so later trials
    also meet the leftovers of earlier kills: staging directories, uncommitted renames.
    """
    rng = random.Random(20240607)
    writer = _Writer()
    try:
        calibration = tmp_path / "calibration"
        pid = writer.run(calibration, 1, 12)
        seconds = [float(line.split()[2]) for line in writer.until_exit(pid)
                   if line.startswith("end")]
        save_s = statistics.median(seconds)

        directory = tmp_path / "trials"
        mgr = CheckpointManager(directory, keep=KEEP)
        expect = meta_for(make_model(), 0)
        trials, phases, newest_ended = 30, Counter[str](), None
        for _ in range(trials):
            pid = writer.run(directory, (mgr.latest() or 0) + 1, 1000)
            target = rng.randint(1, 3)  # which save of this run the kill aims at
            lines: list[str] = []
            while sum(x.startswith("begin") for x in lines) < target:
                lines.append(writer.line())
            # Uniform over 1.3 save times after a "begin" line: mostly mid-save, some
            # after it, between saves or early in the next one.
            time.sleep(rng.uniform(0.0, 1.3 * save_s))
            os.kill(pid, signal.SIGKILL)
            lines += writer.until_exit(pid)
            began = [int(x.split()[1]) for x in lines if x.startswith("begin")]
            ended = [int(x.split()[1]) for x in lines if x.startswith("end")]
            newest_ended = max(ended, default=newest_ended)

            latest = mgr.latest()
            if newest_ended is not None:  # every finished save survives, none is invented
                assert latest is not None and newest_ended <= latest <= max(began)
            if latest is not None:
                state, _, found = mgr.load(latest, expect=expect)
                assert found.step == latest and filled_with(state, latest)
                assert mgr.load_latest_valid()[0] == latest
                # A kill after the marker but before pruning leaves one extra; the next
                # commit removes it.
                assert len(mgr.committed_steps()) <= KEEP + 1
            in_flight = began[-1] if lines[-1].startswith("begin") else None
            phases[kill_phase(directory, in_flight, latest)] += 1
    finally:
        writer.close()
    print(f"{trials}/{trials} kills, newest committed checkpoint loaded every time; "
          f"the kill landed: {dict(phases)}; "
          f"save of a 7.0 MiB model: median {save_s * 1e3:.1f} ms, "
          f"min {min(seconds) * 1e3:.1f}, max {max(seconds) * 1e3:.1f} over {len(seconds)}")
