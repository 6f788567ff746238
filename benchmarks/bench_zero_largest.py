"""The largest model each variant trains under a memory limit: now ``gradsync bench memory
--largest`` (gradsync/bench/memory.py); this wrapper keeps the commands of
docs/benchmarks.md section 17 runnable with their old meaning (2 steps per launch, the
fixed mmap threshold unless ``--glibc-dynamic``, fsdp2 among the variants)::

    flock -x /tmp/gradsync-bench.lock .venv/bin/python -m benchmarks.bench_zero_largest \\
        --limit-mib 3000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_zero_memory import add_common, common_argv, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common(p, steps=2)
    p.add_argument("--limit-mib", required=True)
    p.add_argument("--start", default="4")
    p.add_argument("--max-layers", default="64")
    args = p.parse_args(argv)
    return run(common_argv(args) + ["--largest", "--limit-mib", args.limit_mib, "--start",
                                    args.start, "--max-layers", args.max_layers])


if __name__ == "__main__":
    sys.exit(main())
