"""The worker's side of `gradsync run --timeline FILE`: a script's collectives on a timeline.

The launcher sets GRADSYNC_TIMELINE=FILE in every rank's environment (under the Horovod
facade HOROVOD_TIMELINE=FILE works too, as with horovodrun) and merges the ranks' files
``FILE.rank<N>`` into FILE when the run ends. In a rank, the first of hvd.init() or a
gradsync.DataParallel to be built opens this rank's file (collective: the ranks align their
clocks, gradsync/observe/clock.py); the Horovod facade's collectives and DistributedOptimizer
and DataParallel's buckets record into it. The format is gradsync train --timeline's
(gradsync/observe/timeline.py; docs/observability.md).

A script has no step loop the launcher can see, so events are written every
:data:`FLUSH_EVERY` of them and at exit, not once per step: a killed rank loses at most
that many. (Imports torch: the launcher imports it only to merge, with --timeline.)
"""

from __future__ import annotations

import atexit
import os

from ..comm.elastic import STORE_ENV
from ..observe.clock import align_clocks
from ..observe.timeline import Timeline, rank_path

ENV, HOROVOD_ENV = "GRADSYNC_TIMELINE", "HOROVOD_TIMELINE"
FLUSH_EVERY = 64
_OPEN: dict = {}  # this process's one timeline, by path (one per process, as Horovod's)


class ScriptTimeline(Timeline):
    """A Timeline that writes every FLUSH_EVERY events (nobody flushes it per step)."""

    def record(self, *args, **kwargs) -> None:
        super().record(*args, **kwargs)
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()


def timeline_path() -> str | None:
    """The FILE a script's timeline goes to (GRADSYNC_TIMELINE, else HOROVOD_TIMELINE)."""
    return os.environ.get(ENV) or os.environ.get(HOROVOD_ENV) or None


def script_timeline(group):
    """This rank's timeline (opened at the first call: collective on ``group``), or None
    when no FILE was asked for."""
    path = timeline_path()
    if path is None or os.environ.get(STORE_ENV):  # not built for elastic jobs
        return None
    if path not in _OPEN:
        timeline = ScriptTimeline(rank_path(path, group.rank), group.rank, align_clocks(group))
        atexit.register(timeline.close)
        _OPEN[path] = timeline
    return _OPEN[path]


def record(name: str, start: float, end: float, **args) -> None:
    """A span on the open timeline's compute row (nothing when none is open)."""
    for timeline in _OPEN.values():
        timeline.record(name, start, end, **args)


def merge_here(path: str, ranks: int) -> None:
    """(The launcher, at the end.) Merge the files of ranks 0..ranks-1 found here into
    ``path``, saying where it is (the rank files stay, as gradsync train's)."""
    from ..exits import say
    from ..observe.timeline import merge_ranks

    try:
        merged = merge_ranks(path, ranks)
    except (OSError, ValueError) as exc:  # a file cut short by a kill inside its write
        say(f"gradsync: the timeline's rank files could not be merged: {exc}")
        return
    if merged:
        say(f"gradsync: timeline of ranks {merged[0]}..{merged[-1]}: {path}")
