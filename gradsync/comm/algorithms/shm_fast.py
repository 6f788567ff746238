"""Small all-reduces on one host through compiled code: one C call per ``all_reduce``.

A 1 KiB all-reduce through algorithms/shm.py costs about 13 us of Python (argument checks,
the group's bookkeeping, two flag posts, a spin) where MPICH's whole ``MPI_Allreduce`` is
1.4-3.6 us (docs/benchmarks.md, section 18). Here the work of one call, the same protocol on
the same segment (wait for the previous call's readers, copy in, arrive, wait, reduce in rank
order, done), is one call into ``gradsync.comm._shmfast`` (``_shmfast.c``, built with the
package), and the checks in front of it are made once:

- :func:`remember` runs after the general path of ``collectives.all_reduce`` validated a call
  (op, dtype, algorithm, ``auto``'s choice) and stores a :class:`Plan` for its (shape, dtype,
  op, algorithm) on the group, or ``None`` when the call does not qualify (not shm, over
  ``SMALL_BYTES``, a dtype or op the C code lacks);
- :func:`try_all_reduce` looks the plan up and re-checks only what can change between two
  calls with that key (contiguity, device, autograd, check mode, queued async calls, the
  group's topology, which ``auto`` reads).

Without the extension (a build without a compiler) every call takes the Python path; one
debug line says so. Waits that are not met within the C code's bounded spin return to
:func:`shm_segment.wait_for`, which times out and names the rank as the Python path does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..group import Group, last_world, world
from ..ops import ReduceOp
from ..p2p import P2P
from .shm import ARRIVED, DONE, SMALL_BYTES
from .shm_segment import Segment, drop, segment, wait_for

log = logging.getLogger(__name__)

try:
    from .. import _shmfast
except ImportError as exc:          # built without a compiler: the Python path serves
    _shmfast = None
    log.debug("gradsync.comm._shmfast is not available (%s); small shared-memory "
              "all-reduces take the Python path", exc)

# Codes of _shmfast.c's dtype and op enums. Float16/bfloat16 stay on the Python path: torch
# computes their sums in float32 and rounds per step, which the C code would have to copy.
DTYPES = {torch.float32: 0, torch.float64: 1, torch.int32: 2, torch.int64: 3, torch.uint8: 4,
          torch.int8: 5, torch.int16: 6}
OPS = {ReduceOp.SUM: 0, ReduceOp.AVG: 1, ReduceOp.MAX: 2, ReduceOp.MIN: 3,
       ReduceOp.PRODUCT: 4}
YIELDS = 64             # sched_yield()s in C before Python's wait_for takes over


@dataclass(eq=False)
class Plan:
    """What one (shape, dtype, op, algorithm) of all_reduce needs on a group, made once."""

    members: tuple[int, ...]    # the segment cache's key (the whole group)
    numel: int
    nbytes: int
    dtype: int                  # DTYPES code
    op: int                     # OPS code
    what: str                   # the name errors give the call: "all_reduce(shm)"
    topology: object            # the group's topology when auto chose; another one re-plans
    seg: Segment | None = None  # the group's segment for the members, while not retired


def remember(group: Group, key: tuple, op: ReduceOp, chosen: str, nbytes: int,
             tensor: torch.Tensor) -> None:
    """Store the plan for ``key`` (shape, dtype, op as given, algorithm as given), or None
    when such calls must keep the general path. Called by the general path only."""
    plans = group.small_plans
    if len(plans) > 256:        # a run of ever-new shapes does not grow it forever
        plans.clear()
    fits = (_shmfast is not None and chosen == "shm" and group.size > 1
            and 0 < nbytes <= SMALL_BYTES and tensor.dtype in DTYPES and tensor.is_cpu)
    plans[key] = Plan(tuple(range(group.size)), tensor.numel(), nbytes, DTYPES[tensor.dtype],
                      OPS[op], f"all_reduce({chosen})", group.topology) if fits else None


def try_all_reduce(tensor: torch.Tensor, op, group: Group | None, algorithm: str) -> bool:
    """All-reduce ``tensor`` in place through the compiled path when a plan says it may;
    False: nothing was done, take the general path.

    Raises:
        CommTimeoutError / PeerLostError: as algorithms/shm.py (the message names the rank).
    """
    if group is None:
        group = last_world() or world()
    plan = group.small_plans.get((tensor.shape, tensor.dtype, op, algorithm))
    if (plan is None or group.check or group._pending or not tensor.is_contiguous()
            or tensor.requires_grad or not tensor.is_cpu or plan.topology is not group.topology):
        return False
    stats, seg = group.stats, plan.seg
    stats.calls += 1
    group.seq += 1
    group.current_op = "all_reduce"
    group.op_started = time.monotonic()
    try:
        if seg is None or seg.retired or seg.capacity < plan.nbytes:
            # collective (every rank comes here in the same call): the cached segment, or
            # a new one
            seg = plan.seg = segment(_p2p(group, plan), plan.nbytes)
        seg.seq += 1
        stage = _shmfast.all_reduce(seg.base, seg.header, seg.capacity, seg.p, group.rank,
                                    seg.seq, tensor.data_ptr(), plan.numel, plan.dtype,
                                    plan.op, seg.cspins, YIELDS, 0)
        if stage:
            _resume(group, plan, seg, tensor, stage)
    except BaseException:
        drop(_p2p(group, plan))     # as shm._guarded: a later call makes a new segment
        raise
    stats.bytes_shm += plan.nbytes
    group.finished_seq = group.seq
    return True


def _resume(group: Group, plan: Plan, seg: Segment, tensor: torch.Tensor, stage: int) -> None:
    """A bounded wait in C ran out: Python's waits time out and name the rank (or find the
    peer's process gone); then C goes on from where it stopped."""
    while stage:
        p2p = _p2p(group, plan)
        if stage == 1:
            wait_for(seg, DONE, seg.seq - 1, p2p)
        else:
            wait_for(seg, ARRIVED, seg.seq, p2p)
        stage = _shmfast.all_reduce(seg.base, seg.header, seg.capacity, seg.p, group.rank,
                                    seg.seq, tensor.data_ptr(), plan.numel, plan.dtype,
                                    plan.op, seg.cspins, YIELDS, stage)


def _p2p(group: Group, plan: Plan) -> P2P:
    return P2P(group, f"{plan.what} #{group.seq}{group.where()}")
