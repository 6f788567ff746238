"""How a `gradsync` process ends: its exit codes, the user error, the one-line report.

Shared by the CLI (which dispatches), the ranks of a run (which report their own failure in
one line) and the launcher (which adds no story to a rank that has said why itself). No torch
import: the launcher must start fast.
"""

from __future__ import annotations

import os
import sys

EXIT_USAGE = 2        # a user error, said in one line
EXIT_AGREED = 3       # every rank stopped for one reason, which rank 0 printed
EXIT_INTERRUPTED = 130
# A rank exiting with one of these has said why itself: the supervisor adds nothing.
SELF_EXPLAINED = frozenset({EXIT_USAGE, EXIT_AGREED, EXIT_INTERRUPTED})


class UserError(Exception):
    """A problem with what the user asked for: reported in one line, no traceback."""


def say(line: str) -> None:
    """One line on stderr in one write, so that the lines of several ranks never interleave."""
    sys.stderr.flush()
    os.write(2, (line + "\n").encode(errors="replace"))


def under_launcher() -> bool:
    """This process is one rank of a launched job (torchrun, gradsync's launcher, mpiexec
    once adopted): RANK and WORLD_SIZE are set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
