"""Bus bandwidth of all_reduce per algorithm, for tests/test_lab.py; run once per rank.

    gradsync lab run -- python -m tests._lab_allreduce [MIB] [ALGORITHM ...]

Each rank all-reduces a float32 tensor of MIB MiB (default 16) filled with rank + 1: one
warm-up, then 3 timed calls per algorithm (default ring, native, reduce_broadcast). Every
result is checked against the closed form n(n+1)/2. Rank 0 prints one JSON line:
{"world_size", "bytes", "busbw": {algorithm: bytes/s}, "times": {algorithm: [s, ...]}}, with
busbw = S/t * 2(n-1)/n (nccl-tests) from the median time t.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from gradsync import comm

WARMUP, ITERS = 1, 3


def main(argv: list[str]) -> int:
    mib = float(argv[0]) if argv else 16.0
    algorithms = argv[1:] or ["ring", "native", "reduce_broadcast"]
    torch.set_num_threads(1)
    group = comm.init_process_group(timeout_s=120)
    n, rank = group.size, group.rank
    numel = int(mib * (1 << 20)) // 4
    expected = n * (n + 1) / 2  # sum of rank + 1 over the ranks: exact in float32
    busbw, times = {}, {}
    try:
        for algorithm in algorithms:
            samples = []
            for i in range(WARMUP + ITERS):
                t = torch.full((numel,), float(rank + 1), dtype=torch.float32)
                comm.barrier()
                start = time.perf_counter()
                comm.all_reduce(t, algorithm=algorithm)
                elapsed = time.perf_counter() - start
                wrong = int((t != expected).sum())
                if wrong:
                    raise AssertionError(f"{algorithm}: {wrong} wrong elements on rank {rank}")
                if i >= WARMUP:
                    samples.append(elapsed)
            t_med = statistics.median(samples)
            times[algorithm] = samples
            busbw[algorithm] = numel * 4 / t_med * 2 * (n - 1) / n
        if rank == 0:
            print(json.dumps({"world_size": n, "bytes": numel * 4, "busbw": busbw,
                              "times": times}), flush=True)
    finally:
        comm.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
