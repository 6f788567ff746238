"""Run by tests/test_mpi.py under ``mpiexec -n P``: gradsync's collectives on the MPI engine.

Rank r holds x_r[i] = (r + 1) + (i % 3), so every expectation has a closed form in P (and is
exact in every dtype tested: small integers and halves). Each rank prints one line,
``RESULT {"rank": r, "failures": [...]}``; the test wants every list empty.
"""

import json
import math
import sys
import traceback

import torch
from torch import nn

import gradsync
from gradsync import comm
from gradsync.comm import group as group_module
from gradsync.comm.mpi import MPI_ENGINE, Communicator

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32,
          torch.int64)
OPS = ("sum", "avg", "max", "min", "prod")
ALGORITHMS = ("native", "ring", "tree", "halving_doubling", "reduce_broadcast")
N = 7  # odd, so chunks of the own algorithms differ in size

failures: list[str] = []


def expect(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype != want.dtype or not torch.equal(got, want):
        failures.append(f"{name}: got {got.tolist()} want {want.tolist()}")


def expected(op: str, p: int, dtype: torch.dtype, ranks) -> torch.Tensor:
    c = torch.arange(N) % 3
    values = [(r + 1) + c for r in ranks]  # one (N,) per member, in float64 for the closed form
    if op == "sum":
        want = sum(v.double() for v in values)
    elif op == "avg":
        want = sum(v.double() for v in values) / p
    elif op == "max":
        want = torch.stack(values).max(0).values.double()
    elif op == "min":
        want = torch.stack(values).min(0).values.double()
    else:
        want = torch.tensor([math.prod(int(v[i]) for v in values) for i in range(N)]).double()
    return want.to(dtype)


def all_reduces(group: comm.Group, ranks, label: str, algorithms=ALGORITHMS, dtypes=DTYPES,
                ops=OPS) -> None:
    me = ranks[group.rank]
    for algorithm in algorithms:
        for dtype in dtypes:
            for op in ops:
                if op == "avg" and not dtype.is_floating_point:
                    continue
                x = ((me + 1) + torch.arange(N) % 3).to(dtype)
                comm.all_reduce(x, op=op, group=group, algorithm=algorithm)
                expect(f"{label} all_reduce {algorithm} {dtype} {op}", x,
                       expected(op, group.size, dtype, ranks))


def others(world: comm.Group) -> None:
    p, r = world.size, world.rank
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        x = (torch.arange(5) + 10 * r).to(dtype)
        comm.broadcast(x, src=p - 1)
        expect(f"broadcast {dtype}", x, (torch.arange(5) + 10 * (p - 1)).to(dtype))

        out = [torch.empty(3, dtype=dtype) for _ in range(p)]
        comm.all_gather(out, torch.full((3,), r, dtype=dtype))
        expect(f"all_gather {dtype}", torch.stack(out),
               torch.arange(p).to(dtype).repeat_interleave(3).view(p, 3))

        # input_list[i] = r + i, so rank r gets sum_q (q + r) = p(p-1)/2 + p r.
        for algorithm in ("native", "ring"):
            out1 = torch.empty(4, dtype=dtype)
            comm.reduce_scatter(out1, [torch.full((4,), r + i, dtype=dtype) for i in range(p)],
                                algorithm=algorithm)
            expect(f"reduce_scatter {algorithm} {dtype}", out1,
                   torch.full((4,), p * (p - 1) // 2 + p * r, dtype=dtype))

        y = torch.full((2,), r + 1, dtype=dtype)
        comm.reduce(y, dst=0, op="sum")
        if r == 0:
            expect(f"reduce {dtype}", y, torch.full((2,), p * (p + 1) // 2, dtype=dtype))

        pieces = [torch.full((2,), 100 + i, dtype=dtype) for i in range(p)] if r == 1 else None
        got = torch.empty(2, dtype=dtype)
        comm.scatter(got, pieces, src=1)
        expect(f"scatter {dtype}", got, torch.full((2,), 100 + r, dtype=dtype))

        bucket = [torch.empty(2, dtype=dtype) for _ in range(p)] if r == 0 else None
        comm.gather(torch.full((2,), 7 * r, dtype=dtype), bucket, dst=0)
        if r == 0:
            expect(f"gather {dtype}", torch.stack(bucket),
                   (7 * torch.arange(p)).to(dtype).repeat_interleave(2).view(p, 2))

    x = torch.ones(1 << 16)
    work = comm.all_reduce_async(x, algorithm="native")
    work.wait()
    expect("all_reduce_async", x, torch.full((1 << 16,), float(p)))
    comm.barrier()


def sub_group(world: comm.Group) -> None:
    # Ranks {0, P-1}: for P = 3 rank 2 is local rank 1 of the communicator.
    ranks = [0, world.size - 1]
    sub = comm.new_group(ranks)
    if sub is None:
        return
    all_reduces(sub, ranks, "sub", algorithms=("native", "ring", "tree"),
                dtypes=(torch.float32, torch.bfloat16), ops=("sum", "max"))
    x = torch.full((3,), float(world.rank))
    comm.broadcast(x, src=1, group=sub)
    expect("sub broadcast", x, torch.full((3,), float(ranks[1])))


def training_step(world: comm.Group) -> None:
    """DataParallel's averaged gradients equal one process's on the whole batch."""
    p, r, b = world.size, world.rank, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(p * b, 5, generator=g, dtype=torch.float64)
    y = torch.randn(p * b, 2, generator=g, dtype=torch.float64)

    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()

    reference = model()
    nn.functional.mse_loss(reference(x), y).backward()
    for algorithm in ("native", "ring"):
        dp = gradsync.DataParallel(model(), algorithm=algorithm)
        nn.functional.mse_loss(dp(x[r * b:(r + 1) * b]), y[r * b:(r + 1) * b]).backward()
        for (name, mine), ref in zip(dp.module.named_parameters(), reference.parameters()):
            if not torch.allclose(mine.grad, ref.grad, rtol=1e-10, atol=1e-12):
                failures.append(f"DataParallel({algorithm}) grad {name} differs by "
                                f"{(mine.grad - ref.grad).abs().max().item():.3g}")


def main() -> None:
    group_module._ENGINE = MPI_ENGINE
    world = comm.init_process_group()
    assert world.engine is MPI_ENGINE  # group.world() builds the world on the chosen engine
    try:
        if not isinstance(world.pg, Communicator):
            failures.append(f"the world's pg is {type(world.pg).__name__}, not MPI's")
        all_reduces(world, list(range(world.size)), "world")
        others(world)
        sub_group(world)
        training_step(world)
    except Exception:  # noqa: BLE001 - reported to the test, which shows it
        failures.append(traceback.format_exc())
    # One write, newline included: the launcher forwards each rank's output as it comes, and
    # print's two writes can interleave with another rank's line.
    sys.stdout.write("RESULT " + json.dumps({"rank": world.rank, "failures": failures}) + "\n")
    sys.stdout.flush()
    comm.destroy_process_group()


if __name__ == "__main__":
    main()
