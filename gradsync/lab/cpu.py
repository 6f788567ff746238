"""Per-host CPU caps of a lab: each capped host's processes share one cgroup whose CPU
bandwidth is limited, so that one emulated host computes slower than the others (a
straggler, issue 27), as docker's ``--cpus 0.5`` does for a container.

    gradsync lab up --hosts 3 --cpus 0.5,max,max     # host 0 gets half a core, the others all

A cap of C cores is C x 100 ms of CPU time per 100 ms period, for all the host's processes
together. On cgroup v2 it is the file ``cpu.max`` ("50000 100000"); on a machine whose cpu
controller is still mounted as cgroup v1 it is ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``
(the same CFS bandwidth control underneath). The host's cgroup is
``<root>/gradsync/<host namespace>``, created with the lab and removed with it; a process
joins it by writing its pid into ``cgroup.procs`` before it execs the command
(:func:`join_argv`), so every thread and child of a rank is capped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

from .netns import LabError

PERIOD_US = 100_000   # the kernel's default CFS period
MIN_QUOTA_US = 1_000  # the smallest quota cgroups accept
UNCAPPED = ("max", "")


def parse_cpus(text: str, hosts: int) -> list[float | None]:
    """``--cpus 0.5,max,max``: one cap per host in cores (None: uncapped); one value is
    every host's. Raises LabError naming a bad value."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 1:
        parts *= hosts
    if len(parts) != hosts:
        raise LabError(f"--cpus gives {len(parts)} caps for {hosts} hosts; give one per host "
                       "(a number of cores, or max)")
    caps: list[float | None] = []
    for p in parts:
        if p.lower() in UNCAPPED:
            caps.append(None)
            continue
        try:
            cores = float(p)
        except ValueError:
            cores = -1.0
        if not MIN_QUOTA_US / PERIOD_US <= cores <= 1024:
            raise LabError(f"bad --cpus value {p!r}: a number of cores from "
                           f"{MIN_QUOTA_US / PERIOD_US} (e.g. 0.5), or max")
        caps.append(cores)
    return caps


def cgroup_root() -> tuple[Path, int]:
    """Where the caps' cgroups go and the cgroup version: the unified hierarchy when it has
    the cpu controller, else the cgroup v1 cpu hierarchy. Raises LabError when there is
    none."""
    for unified in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        with contextlib.suppress(OSError):
            if "cpu" in (unified / "cgroup.controllers").read_text().split():
                return unified, 2
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists():
        return v1, 1
    raise LabError("--cpus needs cgroups with the cpu controller (cgroup v2's cpu.max or "
                   "v1's cpu.cfs_quota_us); none is mounted under /sys/fs/cgroup")


def cap_path(ns: str) -> str:
    """The cgroup directory of the host whose namespace is ``ns`` (planned, not created)."""
    return str(cgroup_root()[0] / "gradsync" / ns)


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise LabError(f"cannot write {text.strip()!r} to {path}: "
                       f"{exc.strerror or exc}") from None


def create(path: str, cores: float) -> None:
    """The cgroup ``path`` with a bandwidth of ``cores`` cores."""
    root, version = cgroup_root()
    group, quota = Path(path), max(int(cores * PERIOD_US), MIN_QUOTA_US)
    if version == 2:
        # A child may use the cpu controller only when every parent hands it down.
        with contextlib.suppress(OSError):
            (root / "cgroup.subtree_control").write_text("+cpu")
        (root / "gradsync").mkdir(exist_ok=True)
        _write(root / "gradsync" / "cgroup.subtree_control", "+cpu")
        group.mkdir(exist_ok=True)
        _write(group / "cpu.max", f"{quota} {PERIOD_US}\n")
    else:
        group.mkdir(parents=True, exist_ok=True)
        _write(group / "cpu.cfs_period_us", f"{PERIOD_US}\n")
        _write(group / "cpu.cfs_quota_us", f"{quota}\n")


def remove(path: str, timeout_s: float = 5.0) -> None:
    """Remove the cgroup ``path`` (gone already: nothing to do), and the labs' parent group
    when it is left empty. Its processes were killed by the caller; the kernel empties the
    group as they exit, so EBUSY is retried for ``timeout_s``."""
    group, deadline = Path(path), time.monotonic() + timeout_s
    with contextlib.suppress(OSError):  # a process that left the namespace but not the group
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    while True:
        try:
            group.rmdir()
            break
        except FileNotFoundError:
            break
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise LabError(f"cannot remove the cgroup {group}: {exc.strerror}") from None
            time.sleep(0.05)  # (a process killed a moment ago is still exiting)
    with contextlib.suppress(OSError):  # another lab's groups keep it
        group.parent.rmdir()


def join_argv(path: str, argv: list[str]) -> list[str]:
    """``argv`` run from inside the cgroup ``path``: a shell writes its own pid into
    ``cgroup.procs``, then execs ``argv`` (the same process: pid, threads and children stay
    in the group)."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', path, *argv]
