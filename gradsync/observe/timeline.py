"""A Chrome-trace timeline of a run: one row group per rank, valid JSON at every moment.

The file is the trace format's "JSON array" form, one event per line::

    [
    {"name": "process_name", "ph": "M", "pid": 0, ...},
    {"name": "forward", "ph": "X", "pid": 0, "tid": 0, "ts": 1520.3, "dur": 812.0, ...}
    ]

Perfetto and chrome://tracing open it; so does ``json.load``, even after the process was
killed: each flush writes the step's events over the closing bracket and a new bracket after
them, in one ``pwrite`` (Horovod keeps its timeline valid the same way). What can still cut
that write short is a kill landing inside the system call itself, which Linux may stop at a
page boundary; a power loss can lose anything not yet on disk (no fsync, it would cost a
disk flush per step).

Rows: ``pid`` is the rank; ``tid`` 0 its computation (step, forward, backward, the wait for
communication, optimizer step, checkpoint writes, nested), ``tid`` 100 + k the collective of
gradient bucket k (launch to observed completion), ``tid`` 200 + k a Parameter-Server run's
traffic with server k (its partitions' pushes and pulls on a worker, their updates on server
k itself: ``gradsync/ps/trace.py``). Every event's ``args`` holds the step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .clock import Clock, align_clocks

# tids: the rank's computation; bucket k's collective is 100 + k; PS server k's row 200 + k
COMPUTE, BUCKETS, SERVERS = 0, 100, 200
_TAIL = b"\n]\n"


def rank_path(path: str | Path, rank: int) -> Path:
    """The file rank ``rank`` writes while the run goes on: ``path.rank<N>``."""
    return Path(f"{path}.rank{rank}")


class Timeline:
    """Trace events of one rank, written to ``path`` (a context manager; ``close()``).

    Args:
        path: the JSON file (replaced).
        rank: the row group (``pid``) of this rank's events.
        clock: maps ``time.perf_counter()`` readings onto the shared time line; default:
            this process alone, time zero now.

    Usage: ``record(name, start, end, **args)`` with ``perf_counter`` seconds; events are
    buffered until :meth:`flush` (the trainer flushes once per step).
    """

    def __init__(self, path: str | Path, rank: int = 0, clock: Clock | None = None):
        self.path, self.rank = Path(path), rank
        self.clock = clock or Clock.local()
        self.step: int | None = None  # added to every event's args when set
        self._pending: list[bytes] = []
        self._rows: set[int] = set()
        self._events = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, b"[" + _TAIL)  # "[\n]\n": an empty, valid array
        self._size = 1 + len(_TAIL)
        self._event({"name": "process_name", "ph": "M", "pid": rank,
                     "args": {"name": f"rank {rank}"}})
        self._event({"name": "process_sort_index", "ph": "M", "pid": rank,
                     "args": {"sort_index": rank}})
        self.name_row(COMPUTE, "compute")
        c = self.clock
        self._event({"name": "clock aligned", "ph": "i", "s": "p", "pid": rank, "tid": COMPUTE,
                     "ts": 0.0, "args": {"offset_to_rank0_s": c.offset_s,
                                         "spread_s": c.spread_s, "rounds": c.rounds}})
        self.flush()

    def name_row(self, tid: int, name: str) -> None:
        """Name row ``tid`` of this rank (once; later calls keep the first name)."""
        if tid not in self._rows:
            self._rows.add(tid)
            self._event({"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid,
                         "args": {"name": name}})
            self._event({"name": "thread_sort_index", "ph": "M", "pid": self.rank,
                         "tid": tid, "args": {"sort_index": tid}})

    def record(self, name: str, start: float, end: float, tid: int = COMPUTE, **args) -> None:
        """A span ``start``..``end`` (``perf_counter`` seconds) on row ``tid``."""
        if self.step is not None:
            args.setdefault("step", self.step)
        ts = self.clock.us(start)
        self._event({"name": name, "ph": "X", "pid": self.rank, "tid": tid,
                     "ts": round(ts, 1), "dur": round(max(end - start, 0.0) * 1e6, 1),
                     "args": args})

    def _event(self, event: dict) -> None:
        self._pending.append(json.dumps(event, separators=(",", ":")).encode())

    def flush(self) -> None:
        """Write the buffered events, the file staying a closed array (one ``pwrite``)."""
        if not self._pending or self._fd is None:
            return
        body = b",\n".join(self._pending)
        # Over the old "\n]\n": after the first events, a "," ends the last event's line.
        data = (b",\n" if self._events else b"\n") + body + _TAIL
        at = self._size - len(_TAIL)
        os.pwrite(self._fd, data, at)
        self._size = at + len(data)
        self._events += len(self._pending)
        self._pending.clear()

    def close(self) -> None:
        if self._fd is not None:
            self.flush()
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Timeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_timeline(path: str | None, group) -> Timeline | None:
    """The trainer's timeline of this rank (collective on ``group``: every rank aligns its
    clock); None without ``path``."""
    if not path:
        return None
    return Timeline(rank_path(path, group.rank), group.rank, align_clocks(group))


def load(path: str | Path) -> list[dict]:
    """The events of a timeline file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def merge_ranks(path: str | Path, ranks: int) -> list[int]:
    """Merge the files ``path.rank<N>`` of ranks 0..ranks-1 that exist here into ``path``
    (replaced atomically); returns the ranks merged. Ranks on other hosts: copy their files
    next to the others and call this again."""
    found = [r for r in range(ranks) if rank_path(path, r).exists()]
    lines = [json.dumps(e, separators=(",", ":")) for r in found
             for e in load(rank_path(path, r))]
    tmp = Path(f"{path}.tmp")
    tmp.write_text("[\n" + ",\n".join(lines) + "\n]\n", encoding="utf-8")
    tmp.replace(path)
    return found
