"""Peak memory per rank of DataParallel, ZeRO stages 1-3 and torch's FSDP2: now
``gradsync bench memory`` (gradsync/bench/memory.py); this wrapper keeps the commands of
docs/benchmarks.md section 17 runnable with their old meaning.

Its flags map onto the command's, with one default kept: the ranks run with
``MALLOC_MMAP_THRESHOLD_=131072`` (``--fixed-mmap-threshold``) unless ``--glibc-dynamic``,
and the variants include ``fsdp2``::

    flock -x /tmp/gradsync-bench.lock .venv/bin/python -m benchmarks.bench_zero_memory \\
        --limit-mib 16000          # = gradsync bench memory --fsdp2 --fixed-mmap-threshold ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make gradsync importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OLD_VARIANTS = "dp,zero-1,zero-2,zero-3,fsdp2"


def add_common(p: argparse.ArgumentParser, steps: int) -> None:
    """The flags this wrapper and bench_zero_largest.py share, with their old defaults."""
    p.add_argument("--workers", default="4")
    p.add_argument("--hidden", default="2048")
    p.add_argument("--batch", default="32")
    p.add_argument("--steps", default=str(steps))
    p.add_argument("--variants", default=OLD_VARIANTS)
    p.add_argument("--glibc-dynamic", action="store_true")
    p.add_argument("--json")


def common_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--workers", args.workers, "--hidden", args.hidden, "--batch", args.batch,
            "--steps", args.steps, "--variants", args.variants]
    argv += [] if args.glibc_dynamic else ["--fixed-mmap-threshold"]
    return argv + (["--json", args.json] if args.json else [])


def run(argv: list[str]) -> int:
    """``gradsync bench memory *argv`` here; its exit status."""
    from gradsync.cli import main

    sys.argv = ["gradsync", "bench", "memory", *argv]  # the command the report prints
    return main(sys.argv[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common(p, steps=3)
    p.add_argument("--layers", default="13")
    p.add_argument("--limit-mib", default="0")
    args = p.parse_args(argv)
    return run(common_argv(args) + ["--layers", args.layers, "--limit-mib", args.limit_mib])


if __name__ == "__main__":
    sys.exit(main())
