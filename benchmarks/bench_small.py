"""Small all-reduces on a script's default path against MPICH's own, timed the same way.

    .venv/bin/mpiexec -n 2 .venv/bin/python -m benchmarks.bench_small          # 8 B - 64 KiB
    .venv/bin/mpiexec -n 2 .venv/bin/python -m benchmarks.bench_small --calls 2000 --rounds 1

Both run in the same two processes, launched by mpiexec: MPICH's ``MPI_Allreduce`` through
mpi4py on a NumPy view of the tensor (the baseline), and ``gradsync.comm.all_reduce(t)`` with
its default ``algorithm="auto"``, as a script calls it after ``init_process_group()``. Each
sample is a tight loop of ``--calls`` calls (no barrier between calls) divided by its length;
rounds alternate the two so a noisy neighbour hits both alike; a figure is the median of the
rounds. Every loop's last result is checked against the closed form (the inputs are small
integers, so sums stay exact). Prints one line per size and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SIZES = (8, 64, 512, 4 << 10, 16 << 10, 64 << 10)


def _loop(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the figures as JSON here (rank 0)")
    args = parser.parse_args()

    import torch
    from mpi4py import MPI  # the baseline: MPICH itself, as an MPI user would call it

    from gradsync import comm
    from gradsync.comm.collectives import _auto

    torch.set_num_threads(1)
    group = comm.init_process_group()
    world, rank, p = MPI.COMM_WORLD, group.rank, group.size
    rows = []
    for nbytes in SIZES:
        # A loop re-reduces its own output (the values grow to inf, at the same cost); the
        # checked call afterwards starts again from these small integers.
        base = (torch.arange(nbytes // 4) % 4 + 1 + rank).float()
        ours, theirs = base.clone(), base.clone().numpy()
        expected = sum((torch.arange(nbytes // 4) % 4 + 1 + r).float() for r in range(p))
        times: dict[str, list[float]] = {"mpich": [], "gradsync": []}
        for _ in range(args.rounds):
            world.Barrier()
            times["mpich"].append(_loop(
                lambda: world.Allreduce(MPI.IN_PLACE, theirs, op=MPI.SUM), args.calls))
            world.Barrier()
            times["gradsync"].append(_loop(lambda: comm.all_reduce(ours), args.calls))
        ours.copy_(base)
        theirs[:] = base.numpy()
        comm.all_reduce(ours)
        world.Allreduce(MPI.IN_PLACE, theirs, op=MPI.SUM)
        exact = bool(torch.equal(ours, expected)) and bool((theirs == expected.numpy()).all())
        mpich, ours_s = (statistics.median(times[k]) for k in ("mpich", "gradsync"))
        # "C": the loop ran through the compiled small path (comm/algorithms/shm_fast.py).
        plan = group.small_plans.get((ours.shape, ours.dtype, comm.ReduceOp.SUM, "auto"))
        rows.append({"bytes": nbytes, "mpich_us": 1e6 * mpich, "gradsync_us": 1e6 * ours_s,
                     "ratio": ours_s / mpich, "exact": exact,
                     "auto_chose": _auto(group, None, nbytes),
                     "path": "C" if plan is not None else "Python"})
    if rank == 0:
        print(f"{p} ranks under mpiexec, {args.calls} calls a loop, median of {args.rounds}")
        print(f"{'bytes':>7} {'MPICH us':>9} {'gradsync us':>12} {'ratio':>6}  auto  path  exact")
        for row in rows:
            print(f"{row['bytes']:>7} {row['mpich_us']:>9.1f} {row['gradsync_us']:>12.1f} "
                  f"{row['ratio']:>6.2f}  {row['auto_chose']}  {row['path']}  {row['exact']}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"ranks": p, "calls": args.calls, "rows": rows}, f, indent=1)
    comm.destroy_process_group()


if __name__ == "__main__":
    main()
