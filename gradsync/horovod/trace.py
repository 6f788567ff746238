"""The Horovod facade's calls on the script's timeline (`gradsync run --timeline FILE`, or
HOROVOD_TIMELINE=FILE): one span per collective, from its call to its result, on the rank's
compute row; DistributedOptimizer's buckets have rows of their own (gradsync/run/timeline.py).
Without a timeline a call costs one dict lookup."""

from __future__ import annotations

import functools
import time

from ..run import timeline as script

# Re-exported for the calls that hold a handle: the span ends when the handle is waited on.
perf_counter = time.perf_counter


def is_on() -> bool:
    return bool(script._OPEN)


def record(name: str, start: float, tensor=None) -> None:
    """A span ``start``..now named ``name`` (with the tensor's bytes, when given)."""
    args = {} if tensor is None else {"bytes": tensor.numel() * tensor.element_size()}
    script.record(name, start, time.perf_counter(), **args)


def traced(name: str):
    """Decorator: each call of a synchronous collective is a span (the first argument, a
    tensor when it is one, gives the bytes)."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not script._OPEN:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            first = args[0] if args and hasattr(args[0], "element_size") else None
            record(name, start, first)
            return result
        return call
    return wrap
