"""Helpers that several test files share; test files import them from here, never from one
another (a test file's private names are its own).

- running `gradsync` as a user does: :func:`gradsync`, :func:`in_process`,
  :func:`one_line_error`, :func:`run_and_kill` and the /proc helpers behind it;
- the collectives' exact inputs and their closed-form results: :func:`rank_input`,
  :func:`expected`, :func:`digest`;
- the small float64 model and global batches that DataParallel and the Parameter Server are
  compared on, and the one-process oracle: :func:`make_model`, :func:`global_batch`,
  :func:`one_process_reference`;
- :class:`LogCapture`, :func:`module_imports`, :func:`filled_with`, :data:`needs_netns`.

Worker processes import the test module their function lives in, and so this one: it
imports nothing heavier than torch and starts nothing at import.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradsync.launcher.zygote import RANK_NAME
from tests.distributed import scaled

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "gradsync"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


# --- gradsync as a user runs it ------------------------------------------------------------

def gradsync(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`gradsync ARGS` in a fresh interpreter, output captured."""
    return subprocess.run([sys.executable, "-m", "gradsync", *args], capture_output=True,
                          text=True, timeout=scaled(timeout), env=ENV, cwd=REPO)


# torch 2.13's gloo can abort a finished process while the interpreter finalizes, with torch's
# own DDP as with gradsync: "terminate called without an active exception", SIGABRT, no
# Python frame. Seen once in 62 runs of tests/scripts/ddp_script.py under torchrun, and in 1
# of 8 runs of examples/digits_ddp.py with DistributedDataParallel across a 3-host lab (2 of
# 8 with gradsync.DataParallel). A run that a stateless test can repeat is retried once on
# exactly that line; any other failure counts.
FINALIZE_ABORT = "terminate called without an active exception"


def retry_finalize_abort(run: Callable[[], subprocess.CompletedProcess]
                         ) -> subprocess.CompletedProcess:
    """``run()``, once more if a rank was aborted at exit by the line above."""
    result = run()
    if result.returncode != 0 and FINALIZE_ABORT in result.stderr:
        result = run()
    return result


def in_process(capfd, *args: str) -> subprocess.CompletedProcess:
    """`gradsync ARGS` run by calling the CLI's main() here: a refusal that needs no worker
    costs no interpreter start-up (a torch import each)."""
    from gradsync.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def one_line_error(run: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, one line ``gradsync: error: ...`` holding every needle."""
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradsync: error:"), run.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s children."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def rank_of(pid: int) -> int | None:
    """RANK from ``pid``'s environment, or from the name a zygote gives a forked rank."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"RANK="):
            return int(item[5:])
    name = Path(f"/proc/{pid}/comm").read_text().strip()
    return int(name.removeprefix(RANK_NAME)) if name.startswith(RANK_NAME) else None


def alive(pid: int) -> bool:
    """False once ``pid`` is gone or a zombie (dead, not yet reaped by its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # (ESRCH: it exited as we read)
        return False


def run_script(world: int, *args: str, module: str = "tests.scripts.ckpt_digits"
               ) -> subprocess.CompletedProcess:
    """A test script (``python -m module ARGS``) on ``world`` local ranks under gradsync's
    launcher: the job's exit code, and the stderr of the launcher and its workers (which
    inherit this process's fd 2, sent to a file meanwhile, then written on to stderr)."""
    import tempfile

    from gradsync.launcher import launch

    with tempfile.TemporaryFile(mode="w+") as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            code = launch(list(args), world, module=module, grace_s=1.0,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}).returncode
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        text = err.read()
    sys.stderr.write(text)
    return subprocess.CompletedProcess(list(args), code, "", text)


def run_and_kill(args: list[str], victim: int, out: Path, timeout: float = 60):
    """Start `gradsync train ARGS --out OUT`, SIGKILL global rank ``victim`` once rank 0 of
    the workers has logged 5 steps; returns (returncode, stderr, seconds from the kill to the
    end, the summary or None)."""
    proc = subprocess.Popen([sys.executable, "-m", "gradsync", "train", *args, "--no-progress",
                             "--out", str(out)], env=ENV, cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + scaled(timeout)
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, "run did not start"
            time.sleep(0.1)
        workers = children(proc.pid)
        pid = next(pid for pid in workers if rank_of(pid) == victim)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=scaled(timeout))
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not [pid for pid in workers if alive(pid)], "processes left behind"
    summary = out / "summary.json"
    return proc.returncode, stderr, elapsed, json.loads(summary.read_text()) \
        if summary.exists() else None


# --- the collectives' inputs and results in closed form -------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64]
OPS = ["sum", "avg", "max", "min", "prod"]


def raised(fn, *args, **kwargs) -> str:
    """``fn(*args, **kwargs)``'s error as "Type: message" (a check returns it to the test);
    fails when it raises none."""
    try:
        fn(*args, **kwargs)
    except (ValueError, TypeError, AssertionError) as exc:
        return f"{type(exc).__name__}: {exc}"
    raise AssertionError(f"{fn.__name__} did not raise")


def lengths(n: int) -> list[int]:
    """Tensor lengths for a world of ``n``: empty, one, shorter than n, uneven, large-ish."""
    return sorted({0, 1, max(n - 1, 0), 7 * n + 3, 1031})


def rank_input(rank: int, length: int, op: str) -> np.ndarray:
    """Small integers (exact in every dtype) that ``rank`` contributes."""
    rng = np.random.default_rng(1000 * rank + length)
    if op == "prod":  # products of 8 values from {-1, 1, 2} stay exact in bfloat16
        return rng.choice([-1, 1, 2], size=length).astype(np.float64)
    return rng.integers(-8, 9, size=length).astype(np.float64)


def expected(n: int, length: int, op: str) -> np.ndarray:
    """``op`` over the inputs of ranks 0..n-1."""
    stack = np.stack([rank_input(r, length, op) for r in range(n)]) if length else np.zeros((n, 0))
    return {"sum": stack.sum(0), "avg": stack.sum(0) / n, "max": stack.max(0),
            "min": stack.min(0), "prod": stack.prod(0)}[op]


def digest(t: torch.Tensor) -> str:
    """SHA-1 of a tensor's bytes: equal digests across ranks mean bitwise equal results."""
    raw = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0)
    return hashlib.sha1(raw.numpy().tobytes()).hexdigest()


def first_ranks(size: int):
    """A group of world ranks 0..size-1 (the world itself at its size), None on the other
    ranks: a smaller world inside this one. new_group is collective, so every rank of the
    world calls this."""
    from gradsync import comm

    world = comm.world()
    return world if size == world.size else comm.new_group(list(range(size)))


# --- a small model, its global batches, and one process on them ----------------------------

# 10 steps carry momentum and accumulation through several updates, with half the
# collectives of 20 (each one waits on the scheduler when the machine is busy).
STEPS, BATCH, IN, OUT = 10, 4, 12, 3

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


def make_model(seed: int = 0) -> nn.Module:
    """(b, IN) -> (b, OUT), float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, OUT)).double()


def global_batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(size, IN) inputs and (size, OUT) targets of ``step``, the same in every process."""
    g = torch.Generator().manual_seed(step)
    return (torch.randn(size, IN, generator=g, dtype=torch.float64),
            torch.randn(size, OUT, generator=g, dtype=torch.float64))


def one_process_reference(workers: int, optimizer: str, model_fn=make_model) -> list[np.ndarray]:
    """The parameters after STEPS steps of ``optimizer`` in one process on the global batch
    of ``workers`` x BATCH."""
    model = model_fn()
    opt = OPTIMIZERS[optimizer](model.parameters())
    for step in range(STEPS):
        x, y = global_batch(step, workers * BATCH)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().numpy().copy() for p in model.parameters()]


# --- small things ------------------------------------------------------------------------

class LogCapture(logging.Handler):
    """The messages of WARNING and above, as text."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """gradsync/comm/__init__.py -> gradsync.comm"""
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path, package_dir: Path = PACKAGE) -> set[str]:
    """Every module ``path`` imports, anywhere in it (functions, TYPE_CHECKING blocks), as
    absolute dotted names."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # submodules
    return found


def filled_with(state: dict, step: int) -> bool:
    """Whether every tensor of a checkpoint's model holds ``step`` (how saves are marked)."""
    return all(bool((t == step).all()) for t in state["model"].values())


needs_netns = pytest.mark.netns
"""Marks a test that builds network namespaces (root and ``ip netns``); tests/conftest.py
skips it, naming why, where they are unavailable. The check runs only when such a test is
selected."""


def namespaces() -> set[str]:
    """The network namespaces that exist now (a lab's are gone once its run ends)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@functools.cache
def netns_unavailable() -> str | None:
    """Why network namespaces cannot be built here, or None when they can."""
    import secrets

    from gradsync.lab import LabError, netns

    if os.geteuid() != 0:
        return "needs root"
    try:
        netns.check_tools()
        probe = f"gs-probe-{secrets.token_hex(2)}"
        netns.ip("netns", "add", probe)
        netns.ip("netns", "del", probe)
    except LabError as exc:
        return f"network namespaces unavailable: {exc}"
    return None


def infer_until_stopped(url: str, model: str, rows: np.ndarray, answers: list, stop) -> None:
    """POST ``rows`` to ``model``'s infer route at ``url`` until ``stop`` (an Event) is set,
    appending each status code to ``answers``; None and return once the server stopped
    accepting (a shutdown test's client)."""
    import httpx

    with httpx.Client(base_url=url, timeout=scaled(30)) as http:
        while not stop.is_set():
            try:
                answers.append(http.post(f"/v2/models/{model}/infer", json={"inputs": [
                    {"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                     "data": rows.reshape(-1).tolist()}]}).status_code)
            except httpx.TransportError:  # sent after the server stopped accepting
                answers.append(None)
                return


def serve_started(proc, stderr_tail) -> str:
    """The line a `gradsync serve` process prints once it serves ("MODEL step N on URL");
    kills it and fails the test, with ``stderr_tail()``'s last lines, if none comes in time."""
    import select

    deadline = time.monotonic() + scaled(90)
    line = ""
    while not line and time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline()
    if not line:
        proc.kill()
        proc.wait()
        pytest.fail(f"gradsync serve did not start: {stderr_tail()[-2000:]}")
    return line


def stop_serve(proc) -> None:
    """Stop a `gradsync serve` front still running as a user does (SIGTERM: it removes its
    private copy of the served step), SIGKILL it if that fails, and any replica it leaves."""
    if proc.poll() is not None:
        return
    replicas = children(proc.pid)
    proc.terminate()
    try:
        proc.wait(scaled(30))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in replicas:  # (they exit by themselves once their socket closes)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def steps_of(events, pid):
    """{step: {span name: event}} of rank ``pid``'s step row (tid 0) in a --timeline."""
    steps: dict[int, dict] = {}
    for e in events:
        if e["ph"] == "X" and e["pid"] == pid and e["tid"] == 0:
            steps.setdefault(e["args"]["step"], {})[e["name"]] = e
    return steps
