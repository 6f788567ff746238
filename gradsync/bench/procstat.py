"""CPU time from Linux's /proc: the whole machine's by kind, one process's, and the processes
under one, for the benchmarks that say where a run's CPU goes (serving's fronts and replicas,
a lab run's ranks, other load during a benchmark)."""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
_KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_cpu_s() -> dict[str, float]:
    """Seconds of all cores together since boot, by kind (the first line of /proc/stat)."""
    values = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    values += ["0"] * (len(_KINDS) - len(values))
    return {kind: int(v) / TICK for kind, v in zip(_KINDS, values)}


def _stat(pid: int) -> list[str]:
    # The fields after the command's name, which may itself hold spaces and parentheses.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) seconds of process ``pid``, all its threads; OSError once it is gone."""
    fields = _stat(pid)
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def children_of() -> dict[int, list[int]]:
    """Every live process's children, by parent pid."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue  # gone between the listing and the read
    return children


def descendants(root: int) -> list[int]:
    """``root`` and every process under it."""
    children, out, todo = children_of(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out
