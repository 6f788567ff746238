"""`gradsync lab`: the argparse wiring of up / down / status / run.

    gradsync lab up --hosts 3 --rate 200mbit [--rates 1gbit,1gbit,250mbit] [--name NAME]
                    [--cpus 0.5,max,max]
    gradsync lab run [--name NAME] -- python -m gradsync bench collectives -b 16M -e 16M
    gradsync lab status
    gradsync lab down [--name NAME] [--all]

``gradsync/cli.py`` registers it with ``add_parser(subparsers)`` and dispatches to
``main(args)``. A :class:`LabError` becomes one line ``gradsync: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from .cluster import Lab, down, get, status, up
from .netns import LabError, check_tools, format_rate
from .run import run_command

EXIT_USAGE = 2


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``lab`` and its sub-commands to the ``gradsync`` sub-parsers."""
    lab = subparsers.add_parser(
        "lab", help="an emulated cluster: hosts in network namespaces, shaped links",
        description="Emulate a cluster on this machine: each host a network namespace on a "
                    "bridge, each link shaped with tc tbf in both directions. Needs root.")
    lab.set_defaults(_lab_parser=lab)
    sub = lab.add_subparsers(dest="lab_command", metavar="SUBCOMMAND")

    p = sub.add_parser("up", help="create a lab", description="Create a lab of N hosts.")
    p.add_argument("--hosts", type=int, required=True, metavar="N", help="number of hosts")
    p.add_argument("--rate", default="1gbit",
                   help="every link's rate in tc units: 100mbit, 1gbit, ... (default 1gbit)")
    p.add_argument("--rates", metavar="R1,R2,...",
                   help="one rate per host instead of --rate, e.g. 1gbit,1gbit,250mbit")
    p.add_argument("--procs-per-host", type=int, default=1, metavar="P",
                   help="process slots per host for `lab run` (default 1)")
    p.add_argument("--name", help="the lab's name (default: its prefix gs-XXXX)")
    p.add_argument("--cpus", metavar="C1,C2,...",
                   help="CPU cap per host in cores, for all its processes together (a cgroup's "
                        "cpu.max), e.g. 0.5,max,max: host 0 at half a core; one value caps "
                        "every host (default: none)")

    p = sub.add_parser("down", help="remove a lab", description="Remove a lab and everything "
                       "it created; a lab that is already gone is not an error.")
    p.add_argument("--name", help="the lab (default: the only one)")
    p.add_argument("--all", action="store_true", help="remove every lab")

    sub.add_parser("status", help="list the labs", description="List the labs: name, "
                   "hosts, addresses and link rates.")

    p = sub.add_parser("run", help="run a command on every host of a lab",
                       description="Run COMMAND once per process slot inside the hosts' "
                       "namespaces with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT "
                       "and GLOO_SOCKET_IFNAME set; output is prefixed by rank.")
    p.add_argument("--name", help="the lab (default: the only one)")
    p.add_argument("--port", type=int, default=29500, help="MASTER_PORT (default 29500)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="stop every rank after this long (exit 124)")
    # dest "argv": "command" is the top-level sub-command's attribute (gradsync lab ...).
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    return lab


def _cap(host) -> str:
    return f"  {host.cpus:g} cpus" if host.cpus else ""


def _print_lab(lab: Lab) -> None:
    rates = ",".join(format_rate(h.rate) for h in lab.hosts)
    print(f"{lab.name}: {len(lab.hosts)} hosts on {lab.subnet}, links {rates}")
    for h in lab.hosts:
        print(f"  h{h.index}  {h.addr:<15} {format_rate(h.rate):>9}  namespace {h.ns}, "
              f"interface {h.ifname}{_cap(h)}")


def _up(args: argparse.Namespace) -> int:
    rates = [r.strip() for r in args.rates.split(",")] if args.rates else None
    lab = up(args.hosts, args.rate, rates, args.procs_per_host, args.name, cpus=args.cpus)
    _print_lab(lab)
    print(f"run commands with `gradsync lab run --name {lab.name} -- COMMAND`; "
          f"remove it with `gradsync lab down --name {lab.name}`")
    return 0


def _down(args: argparse.Namespace) -> int:
    check_tools()
    labs = status()
    if args.all:
        names = [lab.name for lab in labs]
    elif args.name is not None:
        names = [args.name]
    else:  # the only lab; several is an error (get raises), none is nothing to do
        names = [get(None).name] if labs else []
    removed = [name for name in names if down(name)]
    for name in removed:
        print(f"removed lab {name}")
    if not removed:  # nothing to remove is not an error: down is idempotent
        print("no lab " + (f"named {args.name!r} " if args.name else "") + "is up")
    return 0


def _status(args: argparse.Namespace) -> int:
    labs = status()
    if not labs:
        print("no lab is up")
        return 0
    for lab in labs:
        state = lab.state if lab.state != "up" or lab.alive() else "broken (namespaces gone)"
        print(f"{lab.name}  {len(lab.hosts)} hosts x {lab.procs_per_host} procs  {lab.subnet}  "
              f"{state}")
        for h in lab.hosts:
            print(f"  h{h.index}  {h.addr:<15} {format_rate(h.rate):>9}{_cap(h)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        raise LabError("no command to run; usage: gradsync lab run [--name NAME] -- COMMAND")
    lab = get(args.name)
    if not lab.alive():
        raise LabError(f"lab {lab.name} is not intact; remove it with "
                       f"`gradsync lab down --name {lab.name}`")
    return run_command(lab, command, master_port=args.port, timeout_s=args.timeout)


def main(args: argparse.Namespace) -> int:
    """Execute ``gradsync lab ...``; returns the exit status."""
    handlers = {"up": _up, "down": _down, "status": _status, "run": _run}
    if getattr(args, "lab_command", None) is None:
        args._lab_parser.print_help()
        return EXIT_USAGE
    try:
        return handlers[args.lab_command](args)
    except LabError as exc:
        print(f"gradsync: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
