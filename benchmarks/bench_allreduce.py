"""Moved to `gradsync bench collectives` (gradsync/bench/collectives.py); this keeps the old name.

    python -m benchmarks.bench_allreduce [FLAGS]    # = gradsync bench collectives [FLAGS]

The flags are the same (-b, -e, -f, -n, -w, --workers, --calibrate, --json), and more:
see `gradsync bench collectives --help`.
"""

import sys

from gradsync.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "collectives", *sys.argv[1:]]))
