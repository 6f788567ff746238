"""The `gradsync run` sub-command: flags derived from :class:`RunConfig`, then the script.

    gradsync run [FLAGS] train.py [ARGS ...]
    gradsync run [FLAGS] -m package.module [ARGS ...]
    gradsync run -np 4 [-H localhost:4] train.py       # horovodrun's flags (horovodrun.py)

Everything after the script (or module) is the script's own. torchrun's underscore spellings
of the flags (``--nproc_per_node``) are accepted too.
"""

from __future__ import annotations

import argparse

from ..exits import UserError
from ..flags import add_dataclass_arguments, config_from_args
from .config import RunConfig
from .horovodrun import SHORT, resolve

# Flags with a value, in their dashed form, for normalize_argv (bools and -m take none).
_NO_VALUE = {"--elastic", "--no-elastic", "--module", "--no-python", "--standalone",
             "-m", "-h", "--help"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``run`` to the ``gradsync`` sub-parsers."""
    p = subparsers.add_parser(
        "run", help="run your own script on several processes (torchrun's flags)",
        description="Run a Python script (or -m module) on several worker processes with "
                    "torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, "
                    "GROUP_RANK, MASTER_ADDR, MASTER_PORT, ...), supervised: a failed rank "
                    "is named and the others stopped. Also across emulated hosts (--lab) "
                    "and elastic (--elastic).")
    add_dataclass_arguments(p, RunConfig)
    p.add_argument("-m", "--module", action="store_true",
                   help="run SCRIPT as a module: python -m SCRIPT")
    p.add_argument("--no-python", action="store_true",
                   help="run SCRIPT itself, not through python")
    p.add_argument("--standalone", action="store_true",
                   help="accepted for torchrun's sake: one node is the default")
    p.add_argument("script", metavar="SCRIPT", help="the script (or module, with -m)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the script's own arguments")
    return p


def normalize_argv(argv: list[str]) -> list[str]:
    """``run --nproc_per_node 2 t.py --my_flag`` -> ``run --nproc-per-node 2 t.py --my_flag``:
    torchrun's underscore spellings, and horovodrun's ``-np`` / ``-H`` as ``--num-proc`` /
    ``--hosts``, up to the script (whose arguments are left alone)."""
    if not argv or argv[0] != "run":
        return argv
    out, i = ["run"], 1
    while i < len(argv):
        token = argv[i]
        if not token.startswith("-"):  # the script: the rest is its own
            return out + argv[i:]
        name, eq, value = token.partition("=")
        name = SHORT.get(name, name)  # horovodrun's -np N, -H HOSTS
        if name.startswith("--"):
            name = "--" + name[2:].replace("_", "-")
        out.append(name + eq + value)
        if not eq and name not in _NO_VALUE and i + 1 < len(argv):
            out.append(argv[i + 1])  # the flag's value
            i += 1
        i += 1
    return out


def main(args: argparse.Namespace) -> int:
    """Run the script as the flags say; the run's exit status."""
    from .launch import command_of, run

    config = config_from_args(RunConfig, args)
    try:
        config = resolve(config)  # horovodrun's flags as the launcher's own
    except ValueError as exc:
        raise UserError(str(exc)) from None
    cmd = command_of(args.script, args.script_args, module=args.module,
                     no_python=args.no_python)
    return run(config, cmd)
