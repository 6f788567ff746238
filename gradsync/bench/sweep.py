"""What every rank of `gradsync bench collectives` runs: one nccl-tests-style sweep.

For each size from ``minbytes`` to ``maxbytes`` (times ``stepfactor``), every algorithm runs
the collective once per iteration, in an order that rotates from one iteration to the next,
so that drift and a noisy neighbour hit every algorithm alike. Before a call the buffers are
refilled and the ranks meet in a barrier; below 256 KiB a sample times a loop of calls and
divides (nccl-tests' way), so that small sizes report the collective and not the barrier and
timer around it: a loop of about 2 ms, its length set from the first iteration's slowest
rank (1,333 calls of 1.5 us). A sample's time is the slowest rank's, and a size's figure is the median over
its iterations (fewer above 16 MiB, so that large sizes do not dominate the run).

Inputs are small integers, so every result is exact in every dtype and is compared bit for
bit with its closed form: rank r holds v(r, i) = (i + r) mod P + 1 at global index i, with
P = 2 for prod (products are then powers of two, exact in float16) and P = 4 otherwise
(sums stay below 4n, exact in bfloat16 up to 64 ranks). Zero is never a valid result, so
outputs are zeroed before each call to catch an element a collective forgot to write.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

from ..comm.algorithms import registry as comm_algorithms
from ..comm import bus_factor
from ..comm.collectives import BROADCAST_ALGORITHMS
from ..comm.per_rank import ALL_GATHER_ALGORITHMS, REDUCE_SCATTER_ALGORITHMS

# busbw = algbw * factor(n) (nccl-tests, shared/ANCHORS.md). For reduce_scatter and
# all_gather S is the whole array, count * n elements; every rank holds or gets count of them.
FACTORS = {"all_reduce": lambda n: float(bus_factor(n)),
           "reduce_scatter": lambda n: float(bus_factor(n) / 2),
           "all_gather": lambda n: float(bus_factor(n) / 2), "broadcast": lambda n: 1.0,
           "reduce": lambda n: 1.0}
# All-reduce: every algorithm of the registry (native first), then "auto".
ALGORITHMS = {"all_reduce": (*comm_algorithms.ALGORITHMS, "auto"),
              "reduce_scatter": REDUCE_SCATTER_ALGORITHMS, "all_gather": ALL_GATHER_ALGORITHMS,
              "broadcast": BROADCAST_ALGORITHMS, "reduce": ("native",)}
PER_RANK = ("reduce_scatter", "all_gather")  # S = count * n
ROOTED = ("broadcast", "reduce")              # root is rank 0
REDUCING = ("all_reduce", "reduce_scatter", "reduce")
DTYPES = ("float32", "float64", "float16", "bfloat16", "int32", "int64")
REDOPS = ("sum", "max", "min", "prod", "avg")
FULL_ITERS_UP_TO = 16 << 20  # above this, iterations shrink in proportion to the size
MIN_ITERS = 10


def parse_size(text: str) -> int:
    """'1K', '64M', '1G' or plain bytes, powers of 1024 as in nccl-tests."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    body = text.strip().upper().removesuffix("B")
    try:
        value = float(body[:-1]) * units[body[-1]] if body and body[-1] in units else int(body)
    except ValueError:
        raise ValueError(f"cannot parse size {text!r}; use bytes or a K/M/G suffix, "
                         "e.g. 1K, 64M") from None
    if value < 1 or value != int(value):
        raise ValueError(f"size {text!r} must be a whole number of bytes >= 1")
    return int(value)


def format_size(n: int) -> str:
    """The inverse of :func:`parse_size` where it is exact: 1048576 -> '1M'."""
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: sizes, iterations, the collective and the algorithms to compare."""

    minbytes: int = 1 << 10
    """Smallest size S in bytes (-b)."""
    maxbytes: int = 64 << 20
    """Largest size (-e)."""
    stepfactor: int = 4
    """Each size is the previous one times this (-f)."""
    iters: int = 30
    """Timed iterations per size, fewer above FULL_ITERS_UP_TO (-n)."""
    warmup_iters: int = 5
    """Untimed iterations per size before the timed ones (-w)."""
    op: str = "all_reduce"
    dtype: str = "float32"
    redop: str = "sum"
    """Ignored by all_gather and broadcast, which reduce nothing."""
    algorithms: tuple[str, ...] = ("all",)
    """Algorithms of ``op`` to compare; "all" stands for every one."""
    check: bool = False
    """Check every iteration's result; otherwise only the first iteration's."""
    calibrate: bool = False
    """Also run gradsync.comm.calibrate() (all_reduce only)."""

    def __post_init__(self) -> None:
        if self.op not in ALGORITHMS:
            raise ValueError(f"--op {self.op!r}: expected one of {', '.join(ALGORITHMS)}")
        if self.dtype not in DTYPES or self.redop not in REDOPS:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)} and --redop one of "
                             f"{', '.join(REDOPS)}")
        if not 1 <= self.minbytes <= self.maxbytes:
            raise ValueError(f"need 1 <= -b <= -e, got -b {self.minbytes} -e {self.maxbytes}")
        if self.stepfactor < 2 or self.iters < 1 or self.warmup_iters < 0:
            raise ValueError("need -f >= 2, -n >= 1 and -w >= 0")
        if self.redop == "avg" and self.dtype.startswith("int") and self.op in REDUCING:
            raise ValueError(f"--redop avg needs a floating-point --dtype, not {self.dtype}")
        known = ALGORITHMS[self.op]
        algos = known if "all" in self.algorithms else tuple(dict.fromkeys(self.algorithms))
        bad = [a for a in algos if a not in known]
        if bad or not algos:
            raise ValueError(f"--algorithm {','.join(bad) or '(none)'}: {self.op} offers "
                             f"{', '.join(known)} (or all)")
        object.__setattr__(self, "algorithms", algos)

    @property
    def root(self) -> int:
        return 0 if self.op in ROOTED else -1

    @property
    def shown_redop(self) -> str:
        return self.redop if self.op in REDUCING else "none"

    def sizes(self, world: int) -> list[tuple[int, int]]:
        """(bytes S, count per rank) for each size, rounded down to whole elements."""
        elsize = {"float64": 8, "int64": 8, "float16": 2, "bfloat16": 2}.get(self.dtype, 4)
        pieces = world if self.op in PER_RANK else 1
        out, s = [], self.minbytes
        while s <= self.maxbytes:
            count = max(1, s // (elsize * pieces))
            if not out or out[-1][1] != count:
                out.append((count * elsize * pieces, count))
            s *= self.stepfactor
        return out

    def iterations(self, nbytes: int) -> int:
        if nbytes <= FULL_ITERS_UP_TO:
            return self.iters
        return min(self.iters, max(MIN_ITERS, self.iters * FULL_ITERS_UP_TO // nbytes))


def spread(values: list[float]) -> dict:
    """Median and spread of repeated measurements: min, max and the quartiles."""
    xs = sorted(values)
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3,
            "n": len(xs)}


# --- one (op, size) on this rank -------------------------------------------------------------

def _values(r: int, start: int, count: int, period: int, dtype):
    """v(r, i) = (i + r) mod P + 1 for i in [start, start + count)."""
    import torch

    return ((torch.arange(start, start + count) + r) % period + 1).to(dtype)


def _reduced(start: int, count: int, n: int, period: int, redop: str, dtype):
    """reduce over r of v(r, i), in closed form: v depends on (i + r) mod P only."""
    import torch

    fold = {"sum": sum, "avg": sum, "max": max, "min": min, "prod": math.prod}[redop]
    table = [fold((j + r) % period + 1 for r in range(n)) for j in range(period)]
    exact = torch.tensor(table, dtype=torch.float64 if dtype.is_floating_point else torch.int64)
    out = exact[torch.arange(start, start + count) % period].to(dtype)
    return out.div_(n) if redop == "avg" else out  # gradsync divides once, in the dtype


def _memory_pass(buf, n: int, rank: int) -> None:
    """The memory traffic of one shared-memory all-reduce of ``buf`` (count,) on ``n`` ranks
    with nothing to wait for: copy in to a slot, add this rank's 1/n piece of n slots, copy
    the result out, in private buffers (allocated on first use). Every rank runs it at once,
    so they share the memory bus as in the real call; its time is the shm path's floor."""
    import torch

    from ..comm.p2p import chunk_bounds

    global _SLOTS
    if _SLOTS is None or _SLOTS.shape != (n + 1, buf.numel()) or _SLOTS.dtype != buf.dtype:
        _SLOTS = torch.zeros(n + 1, buf.numel(), dtype=buf.dtype)
    _SLOTS[rank].copy_(buf)
    a, b = chunk_bounds(buf.numel(), n)[rank]
    out = _SLOTS[n, a:b]
    out.copy_(_SLOTS[0, a:b])
    for j in range(1, n):
        out.add_(_SLOTS[j, a:b])
    buf.copy_(_SLOTS[n])


_SLOTS = None
MEMORY_BOUND = "memory-bound"   # all_reduce on one host: a row for _memory_pass


class Case:
    """The buffers of one collective and size on this rank: ``reset()`` refills them,
    ``run(algorithm)`` calls the collective, ``wrong()`` counts wrong elements."""

    def __init__(self, cfg: SweepConfig, count: int, rank: int, n: int):
        import torch

        from .. import comm

        dtype, period = getattr(torch, cfg.dtype), 2 if cfg.redop == "prod" else 4
        op, redop = cfg.op, cfg.redop
        self.outputs: list = []    # what the collective writes, zeroed by reset() by default
        self.expected: list = []   # ... and what it must hold afterwards
        self._fill = self._zero
        if op == "all_reduce":
            src = _values(rank, 0, count, period, dtype)
            buf = torch.empty_like(src)
            self._fill = lambda: buf.copy_(src)
            self._call = lambda a: comm.all_reduce(buf, op=redop, algorithm=a)
            self.outputs, self.expected = [buf], [_reduced(0, count, n, period, redop, dtype)]
            self._memory = lambda: _memory_pass(buf, n, rank)
        elif op == "reduce_scatter":  # rank r gets the reduction of everyone's chunk r
            chunks = [_values(rank, c * count, count, period, dtype) for c in range(n)]
            out = torch.empty(count, dtype=dtype)
            self._call = lambda a: comm.reduce_scatter(out, chunks, op=redop, algorithm=a)
            self.outputs = [out]
            self.expected = [_reduced(rank * count, count, n, period, redop, dtype)]
        elif op == "all_gather":
            mine = _values(rank, 0, count, period, dtype)
            self.outputs = [torch.empty(count, dtype=dtype) for _ in range(n)]
            self._call = lambda a: comm.all_gather(self.outputs, mine, algorithm=a)
            self.expected = [_values(r, 0, count, period, dtype) for r in range(n)]
        elif op == "broadcast":
            src = _values(0, 0, count, period, dtype)
            buf = torch.empty_like(src)
            if rank == 0:
                self._fill = lambda: buf.copy_(src)
            self._call = lambda a: comm.broadcast(buf, src=0, algorithm=a)
            self.outputs, self.expected = [buf], [src]
        else:  # reduce: only the root's result is defined
            src = _values(rank, 0, count, period, dtype)
            buf = torch.empty_like(src)
            self._fill = lambda: buf.copy_(src)
            self._call = lambda a: comm.reduce(buf, dst=0, op=redop)
            if rank == 0:
                self.outputs = [buf]
                self.expected = [_reduced(0, count, n, period, redop, dtype)]

    def _zero(self) -> None:
        for out in self.outputs:
            out.zero_()

    def reset(self) -> None:
        self._fill()

    def run(self, algorithm: str) -> None:
        if algorithm == MEMORY_BOUND:
            self._memory()
        else:
            self._call(algorithm)

    def wrong(self) -> int:
        return sum(int((o != e).sum()) for o, e in zip(self.outputs, self.expected))


# --- the sweep ---------------------------------------------------------------------------------

LOOP_BYTES = 256 << 10          # below this a timed sample is a loop of calls, as in nccl-tests
LOOP_TARGET_S = 2e-3            # ... of about this long (the barrier's skew is 1-10 us)
MAX_LOOP_CALLS = 2000


def loop_calls(nbytes: int, per_call_s: float | None = None) -> int:
    """Calls per timed sample: one for large sizes; for small ones a loop whose time is
    divided by its length, so that the barrier before it and the timer's own cost (tens of
    microseconds) do not count as the collective's. With ``per_call_s`` (the slowest rank's,
    from a first sample) the loop lasts about LOOP_TARGET_S: a 1.5 us call then runs 1,333
    times, a 1.5 ms one once."""
    if nbytes >= LOOP_BYTES:
        return 1
    if per_call_s is None:
        return max(1, min(50, LOOP_BYTES // max(1, nbytes)))
    return max(1, min(MAX_LOOP_CALLS, round(LOOP_TARGET_S / max(per_call_s, 1e-9))))


def _timed(case: Case, algorithm: str, calls: int, group) -> float:
    """Seconds per call of ``calls`` back-to-back calls, started together after a barrier
    (each call reduces the previous one's output: the values are not checked here)."""
    from .. import comm

    case.reset()
    comm.barrier(group)
    start = time.perf_counter()
    for _ in range(calls):
        case.run(algorithm)
    return (time.perf_counter() - start) / calls

def _measure_size(case: Case, algos: tuple[str, ...], nbytes: int, total: int, check: bool,
                  group):
    """``total`` samples of each algorithm on one size, in an order rotating per iteration;
    returns (times (len(algos), total) in s per call, the slowest rank's; wrong (len(algos),)
    summed over the ranks)."""
    import torch

    from .. import comm

    times = torch.zeros(len(algos), total, dtype=torch.float64)
    wrong = torch.zeros(len(algos), dtype=torch.float64)
    calls = [loop_calls(nbytes)] * len(algos)
    for it in range(total):
        if it == 1:  # every rank's loops as long as the slowest rank's first sample asks
            first = times[:, 0].clone()
            comm.all_reduce(first, op="max", group=group, algorithm="native")
            calls = [loop_calls(nbytes, float(t)) for t in first]
        for k in range(len(algos)):
            j = (it + k) % len(algos)
            times[j, it] = _timed(case, algos[j], calls[j], group)
            if (check or it == 0) and algos[j] != MEMORY_BOUND:
                if calls[j] > 1:  # the loop fed each call the last one's output: redo one
                    case.reset()
                    case.run(algos[j])
                wrong[j] += case.wrong()
    comm.all_reduce(times, op="max", group=group, algorithm="native")
    comm.all_reduce(wrong, op="sum", group=group, algorithm="native")
    return times, wrong


def run_sweep(cfg: SweepConfig, group=None) -> dict:
    """Measure ``cfg`` on ``group`` (collective: every rank calls it with the same config).

    Returns:
        ``{"world", "rows", "gamma", "calibrated", "auto_chose"}``: one row per size and
        algorithm with the slowest rank's time per iteration summarised by :func:`spread`
        (in us), and #wrong summed over the ranks and the checked iterations. Every rank
        returns the same figures.
    """
    import torch

    from .. import comm
    from ..comm.collectives import DEFAULT_COST_MODEL

    torch.set_num_threads(1)
    group = comm.world() if group is None else group
    rank, n = group.rank, group.size
    gamma = calibrated = None
    if cfg.op == "all_reduce":
        # gamma, the time per byte reduced, on all ranks at once (as in an all-reduce): the
        # cost-model fit needs it to split a slope into wire time and add time.
        x, y = torch.ones(2 << 20), torch.ones(2 << 20)
        x.add_(y)
        start = time.perf_counter()
        for _ in range(20):
            x.add_(y)
        gamma = (time.perf_counter() - start) / 20 / (8 << 20)
        if cfg.calibrate:
            calibrated = vars(comm.calibrate(group))
    algos = cfg.algorithms
    if group.topology is not None and len(group.topology.hosts) > 1:
        algos = tuple(a for a in algos if a != "shm")  # shared memory needs one host
    elif cfg.op == "all_reduce" and "shm" in algos and n > 1:
        algos += (MEMORY_BOUND,)  # the floor of the shm path, measured in the same run
    rows, auto_chose = [], {}
    for nbytes, count in cfg.sizes(n):
        # Below LOOP_BYTES the memory-bound pass is a few torch calls' overhead (~14 us),
        # not memory time: no floor to show there.
        size_algos = tuple(a for a in algos if a != MEMORY_BOUND or nbytes >= LOOP_BYTES)
        case = Case(cfg, count, rank, n)
        n_iter = cfg.iterations(nbytes)
        times, wrong = _measure_size(case, size_algos, nbytes, cfg.warmup_iters + n_iter,
                                     cfg.check, group)
        if cfg.op == "all_reduce":
            auto_chose[nbytes] = DEFAULT_COST_MODEL.choose(nbytes, n, topology=group.topology)
        for j, algo in enumerate(size_algos):
            rows.append({"bytes": nbytes, "count": count, "algorithm": algo, "iters": n_iter,
                         "time_us": spread((1e6 * times[j, cfg.warmup_iters:]).tolist()),
                         "wrong": int(wrong[j].item())})
    return {"world": n, "engine": group.engine.name, "rows": rows, "gamma": gamma,
            "calibrated": calibrated,
            "auto_chose": auto_chose}
