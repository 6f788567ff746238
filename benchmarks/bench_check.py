"""What check mode costs per collective: all_reduce with and without it, interleaved.

    python -m benchmarks.bench_check                 # 2 workers, 1 KiB and 1 MiB, native and ring

Check mode first all-gathers a 15-integer header per call, so its cost is one small engine
collective: it matters for small tensors and vanishes for large ones. Rounds alternate the
two modes so a noisy neighbour affects both alike; each figure is the median over rounds of
the mean time per call in a round.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import (add_worker_flags, command, describe_machine, machine, run_workers,
                        summarize, write_json)

SIZES = (1 << 10, 1 << 20)
ALGORITHMS = ("native", "ring")


def worker(args) -> None:
    import torch

    from gradsync import comm

    torch.set_num_threads(1)
    group = comm.init_process_group(timeout_s=120)
    times: dict[str, list[float]] = {}
    for size in SIZES:
        buf = torch.ones(size // 4)
        for algorithm in ALGORITHMS:
            for check in (False, True):  # warm-up, both paths
                group.check = check
                for _ in range(3):
                    comm.all_reduce(buf, algorithm=algorithm)
            for _ in range(args.rounds):
                for check in (False, True):
                    group.check = check
                    comm.barrier()
                    start = time.perf_counter()
                    for _ in range(args.iters):
                        comm.all_reduce(buf, algorithm=algorithm)
                    key = f"{size}/{algorithm}/{'on' if check else 'off'}"
                    times.setdefault(key, []).append((time.perf_counter() - start) / args.iters)
    if group.rank == 0:
        Path(args.result_file).write_text(json.dumps(times))
    comm.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", help="write the figures to this file")
    add_worker_flags(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    times = run_workers("benchmarks.bench_check", ["--rounds", str(args.rounds), "--iters",
                                                   str(args.iters)], args.workers)
    watch = times.pop("cpu_watch")
    m = machine()
    print(f"# {command('benchmarks.bench_check', argv if argv is not None else [])}")
    print(f"# {describe_machine(m, watch)}")
    print(f"# {args.workers} workers; median over {args.rounds} rounds of {args.iters} calls")
    print(f"{'size':>9} {'algorithm':>10} {'off (us)':>10} {'on (us)':>10} {'overhead':>10}"
          f" {'ratio':>7}")
    rows = []
    for size in SIZES:
        for algorithm in ALGORITHMS:
            off = summarize(times[f"{size}/{algorithm}/off"])
            on = summarize(times[f"{size}/{algorithm}/on"])
            extra = on["median"] - off["median"]
            rows.append({"bytes": size, "algorithm": algorithm, "off": off, "on": on,
                         "overhead_us": 1e6 * extra, "ratio": on["median"] / off["median"]})
            print(f"{size:>9} {algorithm:>10} {1e6 * off['median']:>10.1f} "
                  f"{1e6 * on['median']:>10.1f} {1e6 * extra:>10.1f} "
                  f"{on['median'] / off['median']:>7.2f}")
    if args.json:
        write_json(args.json, {"machine": m, "cpu_watch": watch, "rows": rows})


if __name__ == "__main__":
    main()
