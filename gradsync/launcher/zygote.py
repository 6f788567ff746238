"""Start `python -m MODULE` ranks by forking one process that has already imported torch.

Every rank of ``gradsync train`` used to be a fresh interpreter importing torch and, at its
optimizer's first call, torch._dynamo: about 4 s of CPU each on a 2-core EPYC box, so that
4 ranks spent about 8 s of wall time before their first step, and as much again at each
restart (docs/benchmarks.md, section 14). A zygote (the name Android gave
the idea; multiprocessing's ``forkserver`` is the same idea) is one interpreter that imports
torch and gradsync once, forks a copy of itself for each rank, and the copy then runs
``python -m MODULE ARGV`` as a fresh process would (``runpy``, its own environment,
``sys.argv``, and a normal interpreter exit with atexit handlers and finalisers).

The launcher's supervision (procs.py) wants each rank as its own child: ``waitid`` on it,
PR_SET_PDEATHSIG tied to the launcher, its own session. So the zygote forks twice and the
launcher is a child subreaper while it asks: the middle process exits, the rank is
reparented to the launcher, and only then does the zygote answer with the rank's pid::

    launcher ──request (JSON line)──> zygote ──fork──> middle ──fork──> rank
        ^                               |  waitpid(middle): the rank is now the launcher's
        └──────────── {"pid": N} ───────┘

Requests are JSON lines on a socketpair private to the two processes (nothing is
unpickled). No Python thread runs in the zygote, so a fork never finds one of their locks
held; torch's thread pools start at a rank's first operation, after the fork; the native
threads numpy's OpenBLAS starts at import are restarted in the child by its own atfork
handlers (as under multiprocessing's forkserver, which the tests preload with the same
modules).
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import socket
import subprocess
import sys

from .procs import ForkedRank, make_preexec

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
RANK_NAME = "gradsync r"  # + RANK: a forked rank's name (comm), for `top` and `ps -o comm`
# Resolved here, before any fork: a forked child must not load a library.
_libc = ctypes.CDLL(None, use_errno=True)
# What a `gradsync train` rank imports before its first step (most of its start-up time):
# torch (2 s of CPU on a 2-core EPYC box) and torch._dynamo (2 s more), which torch's
# optimizers import at their first call (their methods are wrapped by torch._disable_dynamo).
PRELOAD = ("torch", "torch._dynamo", "numpy", "gradsync.cli", "gradsync.train.worker",
           "gradsync.comm")


def preload(module: str) -> tuple[str, ...]:
    """What the zygote imports for ranks of ``module``: gradsync's ranks, or the module's
    package (not the module itself: runpy would warn that it ran a module already imported)."""
    if module == "gradsync":
        return PRELOAD
    return (module.rpartition(".")[0],) if "." in module else ()


def common(envs: list[dict[str, str]]) -> dict[str, str]:
    """The variables every one of ``envs`` has with the same value."""
    return {k: v for k, v in envs[0].items() if all(e.get(k) == v for e in envs[1:])}


class Zygote:
    """``with Zygote(module, env, preexec) as z: z.fork(argv, env)`` -> a ForkedRank, the
    launcher's child, running ``python -m module *argv`` with ``env``.

    ``env`` is the zygote's own environment, read while it imports torch (OMP_NUM_THREADS
    sizes OpenMP's pool then): what every rank shares (:func:`common`). ``preexec`` is the
    ranks' ``preexec_fn`` (procs.make_preexec): the zygote dies with the launcher too.

    What differs from a rank started with exec: ``ps`` shows it as the zygote's command
    line and, in its name (``comm``), ``gradsync rN``; /proc/PID/environ holds what the
    ranks share, without the per-rank variables (RANK, LOCAL_RANK, ...), which the rank's
    own ``os.environ`` has."""

    def __init__(self, module: str, env: dict[str, str], preexec) -> None:
        ours, theirs = socket.socketpair()
        self._sock, self.module = ours, module
        self._proc = subprocess.Popen(
            # -c, not -m: gradsync.launcher imports this module, and runpy would warn.
            [sys.executable, "-c", f"from {__name__} import main; main()",
             str(theirs.fileno()), str(os.getpid()), *preload(module)],
            env=env, pass_fds=(theirs.fileno(),),
            start_new_session=True, preexec_fn=preexec)
        theirs.close()
        self._reader = ours.makefile("r", encoding="utf-8")

    def fork(self, argv: list[str], env: dict[str, str]) -> ForkedRank:
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        try:
            request = {"module": self.module, "argv": argv, "env": env}
            self._sock.sendall((json.dumps(request) + "\n").encode())
            line = self._reader.readline()
        finally:
            # Orphans of others must not become ours; the rank already is (see the module).
            _libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        if not line:
            code = self._proc.wait()
            raise OSError(f"the zygote that starts the ranks exited ({code}) before "
                          "starting one")
        reply = json.loads(line)
        if "pid" not in reply:
            raise OSError(f"the zygote could not start a rank: {reply.get('error')}")
        return ForkedRank(reply["pid"], [sys.executable, "-m", self.module, *argv])

    def alive(self) -> bool:
        return self._proc.poll() is None

    def kill(self) -> None:
        self._proc.kill()
        self.close()

    def close(self) -> None:
        self._reader.close()
        self._sock.close()  # the zygote reads EOF and exits
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_prestarted: Zygote | None = None


def prestart(module: str) -> None:
    """Start the zygote of ``module``'s ranks now, with this process's environment, so that
    its imports run beside this process's own (``gradsync train``'s launcher imports torch
    to read its flags: 2 s that the zygote's 4 s no longer wait for). :func:`take` hands
    it to the launch; :func:`discard` ends it if nothing launched."""
    global _prestarted
    discard()
    _prestarted = Zygote(module, dict(os.environ), make_preexec(os.getpid(), None))


def take(module: str, env: dict[str, str], preexec) -> Zygote:
    """The prestarted zygote of ``module`` if there is one, else a new one."""
    global _prestarted
    ready, _prestarted = _prestarted, None
    if ready is not None and ready.module == module and ready.alive():
        return ready
    if ready is not None:
        ready.kill()
    return Zygote(module, env, preexec)


def discard() -> None:
    """End the prestarted zygote, unused."""
    global _prestarted
    if _prestarted is not None:
        _prestarted.kill()
        _prestarted = None


# ---- the zygote's side -------------------------------------------------------------------

def _serve(sock: socket.socket, launcher: int) -> dict | None:
    """Answer fork requests until EOF (returns None); in a rank, return its request."""
    reader = sock.makefile("r", encoding="utf-8")
    for line in reader:
        job = json.loads(line)
        pid_r, pid_w = os.pipe()  # the middle tells the zygote the rank's pid
        go_r, go_w = os.pipe()    # the zygote tells the rank it is the launcher's now
        middle = os.fork()
        if middle == 0:
            os.close(pid_r)
            os.close(go_w)
            if _fork_rank(pid_w, go_r, launcher):
                reader.close()
                sock.close()
                return job
        os.close(pid_w)
        os.close(go_r)
        with os.fdopen(pid_r, "rb") as r:
            pid = int.from_bytes(r.read(8) or b"\0", "little")
        # Reaped, the middle has been through exit_notify(): the rank has a new parent.
        os.waitpid(middle, 0)
        os.write(go_w, b"g")
        os.close(go_w)
        reply = {"pid": pid} if pid else {"error": "fork failed"}
        sock.sendall((json.dumps(reply) + "\n").encode())
    return None


def _fork_rank(pid_w: int, go_r: int, launcher: int) -> bool:
    """In the middle process: fork the rank, report its pid, exit. True in the rank, once
    it is the launcher's child, in its own session, and dies with the launcher."""
    try:
        rank = os.fork()
    except OSError:
        os._exit(1)
    if rank:
        os.write(pid_w, rank.to_bytes(8, "little"))
        os._exit(0)
    os.close(pid_w)
    os.setsid()
    os.read(go_r, 1)  # (EOF instead if the zygote died: the check below decides)
    os.close(go_r)
    _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != launcher:  # the launcher died already, or was no subreaper
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def main() -> None:
    fd, launcher = int(sys.argv[1]), int(sys.argv[2])
    for name in sys.argv[3:]:
        importlib.import_module(name)
    job = _serve(socket.socket(fileno=fd), launcher)
    if job is None:  # the launcher is done with us; nothing of ours needs finalising
        os._exit(0)
    os.environ.clear()
    os.environ.update(job["env"])
    if "torch" in sys.modules and job["env"].get("OMP_NUM_THREADS", "").isdigit():
        # OpenMP read the zygote's environment when torch loaded; the rank's is this one.
        sys.modules["torch"].set_num_threads(max(1, int(job["env"]["OMP_NUM_THREADS"])))
    # `top` and `ps -o comm` tell the ranks apart (the command line is the zygote's).
    name = f"{RANK_NAME}{job['env'].get('RANK', '')}"[:15].encode()
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    sys.argv = [job["module"], *job["argv"]]  # runpy puts the module's file first
    import runpy

    runpy.run_module(job["module"], run_name="__main__", alter_sys=True)

