"""`gradsync bench topology`: which ranks share a host, and each host's measured link.

    gradsync bench topology --lab 4 --rates 1gbit,1gbit,1gbit,250mbit   # emulated (root)
    gradsync bench topology --lab 2 --procs-per-host 2 --save topo.json
    torchrun --nproc-per-node 2 -m gradsync bench topology              # each process a rank

The ranks run :func:`gradsync.comm.probe_topology` (fan-in rounds between one rank per host,
bounded by ``--budget``) and rank 0 prints one line per host: measured rate, ranks, and in a
lab the configured rate and the ratio. ``--save`` writes the JSON that ``gradsync train
--topology FILE`` and :meth:`gradsync.comm.Topology.load` read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..exits import EXIT_USAGE, under_launcher
from .ranks import add_placement_flags, check_placement, run_for_result, usage
from .report import machine_line


def _as_rank(args: argparse.Namespace) -> int:
    from .. import comm

    group = comm.init_process_group()
    try:
        start = time.perf_counter()
        topology = comm.probe_topology(group, budget_s=args.budget)
        seconds = time.perf_counter() - start
    finally:
        comm.destroy_process_group()
    if group.rank == 0:
        result = {"topology": json.loads(topology.to_json()), "probe_s": seconds,
                  "world": group.size}
        if args.result_file:
            Path(args.result_file).write_text(json.dumps(result))
        else:
            report(result, None, args)
    return 0


def report(result: dict, lab: dict | None, args: argparse.Namespace) -> None:
    """Print the hosts (and the lab's configured rates beside the measured ones); --save."""
    from ..comm import Topology

    topology = Topology.from_json(json.dumps(result["topology"]))
    print(f"# gradsync bench topology: {result['world']} ranks on {len(topology.hosts)} hosts, "
          f"probe {result['probe_s'] * 1e3:.0f} ms")
    print(f"# machine: {machine_line()}")
    print("# measured: payload rate of a fan-in into the host from all the others "
          "(min of its link and theirs together)")
    print(f"# {'host':<6} {'measured':>16} {'configured':>16} {'ratio':>6}  ranks")
    for i, host in enumerate(topology.hosts):
        measured = "-" if host.rate is None else f"{host.rate * 8 / 1e6:.1f} Mbit/s"
        configured, ratio = "-", "-"
        if lab is not None:
            bits = lab["rates_bits"][i]
            configured = f"{bits / 1e6:.1f} Mbit/s"
            if host.rate is not None:
                ratio = f"{host.rate * 8 / bits:.3f}"
        print(f"  {host.name:<6} {measured:>16} {configured:>16} {ratio:>6}  "
              f"{','.join(map(str, host.ranks))}")
    if not topology.measured and len(topology.hosts) > 1:
        print("# the probe did not finish within --budget: no rates")
    if args.save:
        topology.save(args.save)
        print(f"# saved to {args.save}")


def main(args: argparse.Namespace) -> int:
    """Run `gradsync bench topology`; returns the exit status."""
    if args.budget <= 0:
        return usage(f"--budget must be positive, got {args.budget}")
    if under_launcher():
        return _as_rank(args)
    wrong = check_placement(args, least=1)
    if wrong:
        return usage(wrong)
    rc, result, lab = run_for_result(["bench", "topology", "--budget", str(args.budget)], args)
    if rc != 0:
        return rc
    try:
        report(result, lab, args)
    except OSError as exc:
        print(f"gradsync: error: cannot save {args.save}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "topology", help="which ranks share a host, each host's measured link",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_placement_flags(p, "probe an emulated cluster of N hosts (needs root)")
    p.add_argument("--budget", type=float, default=10.0, metavar="SECONDS",
                   help="the probe's time limit; past it no rates are reported")
    p.add_argument("--save", metavar="FILE.json", help="write the topology as JSON")
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.set_defaults(bench=main)
