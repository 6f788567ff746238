"""Elastic training from a script: survive the loss of a worker, take a replacement in
(in the spirit of Horovod's ``hvd.elastic``). Start the script with gradsync's elastic
launcher (``gradsync run --elastic --min-workers 2 --max-restarts 1 --nproc-per-node 4
train.py``, or :func:`gradsync.train.elastic_run.launch`)::

    import gradsync.elastic

    world = gradsync.elastic.init()                  # this worker's membership
    state = gradsync.elastic.State(world, build_model(), make_optimizer,
                                   dataset_len=len(x), batch_size=32)

    @gradsync.elastic.run                            # called again after each change
    def train(state):
        for epoch in range(state.epoch, 5):
            for indices, weight in state.batches():  # this worker's share of the step
                state.optimizer.zero_grad()
                (loss_fn(state.model(x[indices]), y[indices]) * weight).backward()
                state.optimizer.step()
                state.commit()                       # a step boundary

    train(state)

When a worker is lost, the survivors form a new group, take the model and optimizer state
of the newest step any of them completed by broadcast, and call ``train`` again; the rest
of the epoch is cut over them keeping the global batch. A replacement started by the
launcher joins at a step boundary the same way. Fewer than the launcher's minimum left:
every worker exits 3 and the launcher says why. How: gradsync/train/elastic_state.py.
"""

from __future__ import annotations

import atexit
import functools
import os
from typing import Callable, TypeVar

from .comm.elastic import STORE_ENV, ElasticDone, ElasticStopped, ElasticWorld
from .exits import EXIT_AGREED, EXIT_USAGE, say
from .train.elastic_state import State
from .train.elastic_sync import MembershipChanged, Share

__all__ = ["ElasticStopped", "ElasticWorld", "MembershipChanged", "Share", "State", "init",
           "run"]
T = TypeVar("T")


def init(timeout_s: float | None = None) -> ElasticWorld:
    """Join the elastic job this process was started in (GRADSYNC_ELASTIC_STORE and
    GRADSYNC_ELASTIC_UID, set by the launcher). No group forms yet: the first one forms
    when the function decorated with :func:`run` is first called.

    Args:
        timeout_s: how long to wait for a generation, and every collective's timeout
            (default GRADSYNC_TIMEOUT, else 300 s).

    Returns:
        this worker's membership, for :class:`State`.

    A process that no elastic launcher started exits 2 with one line that says so.
    """
    from . import env

    if STORE_ENV not in os.environ or "GRADSYNC_ELASTIC_UID" not in os.environ:
        say("gradsync: error: gradsync.elastic.init() needs gradsync's elastic launcher "
            "(`gradsync run --elastic ...`, or gradsync.train.elastic_run.launch): "
            f"{STORE_ENV} and GRADSYNC_ELASTIC_UID are not set")
        raise SystemExit(EXIT_USAGE)
    try:
        timeout = env.timeout_s(300.0) if timeout_s is None else timeout_s
    except ValueError as exc:
        say(f"gradsync: error: {exc}")
        raise SystemExit(EXIT_USAGE) from None
    world = ElasticWorld.from_env(timeout)
    # Close the last generation's group before the interpreter's finalization, which an
    # engine thread still alive then can abort (SIGABRT: a finished worker seen as lost).
    atexit.register(world.abandon)
    return world


def run(func: Callable[..., T]) -> Callable[..., T]:
    """Decorator (Horovod's ``@hvd.elastic.run``): ``func(state, ...)`` runs once the first
    generation has formed and agreed on the state, and again after each change of
    membership (:meth:`State.retry`), until it returns; its value is returned.

    A worker whose run stops leaves here without a traceback (the launcher names why on
    its last line): exit status 3 when fewer than the minimum of workers are left, 0 for a
    replacement that came after the run had finished.
    """
    @functools.wraps(func)
    def wrapper(state: State, *args, **kwargs) -> T:
        try:
            return state.retry(lambda: func(state, *args, **kwargs))
        except ElasticStopped:
            raise SystemExit(EXIT_AGREED) from None
        except ElasticDone:
            raise SystemExit(0) from None

    return wrapper
