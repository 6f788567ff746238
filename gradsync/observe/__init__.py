"""Seeing where a run's time goes: a Chrome-trace timeline of every rank (``timeline.py``),
its clocks aligned at start-up (``clock.py``), TensorBoard scalars (``tensorboard.py``),
stragglers named (``stragglers.py``), plots of a run's files (``plots.py``);
docs/observability.md.

    with gradsync.observe.Timeline("trace.json") as tl:   # a script, one process
        t0 = time.perf_counter(); ...; tl.record("forward", t0, time.perf_counter())
"""

from .clock import Clock, align_clocks
from .plots import write_run_plots
from .stragglers import StragglerWatch, find_stragglers, waited_for
from .tensorboard import TensorBoardLog
from .timeline import Timeline, load, merge_ranks, open_timeline, rank_path

__all__ = ["Clock", "StragglerWatch", "TensorBoardLog", "Timeline", "align_clocks",
           "find_stragglers", "load", "merge_ranks", "open_timeline", "rank_path",
           "waited_for", "write_run_plots"]
