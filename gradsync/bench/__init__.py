"""`gradsync bench`: benchmarks in the style of nccl-tests, and training throughput."""


def add_parser(subparsers) -> None:
    """Register ``bench`` and its sub-commands."""
    from . import train

    bench = subparsers.add_parser("bench", help="measure collectives, training throughput and memory",
                                  description="Benchmarks; every figure comes with the machine "
                                  "and the command that reproduces it.")
    sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)
    train.add_parser(sub)
    try:
        from . import collectives
    except ImportError:  # pragma: no cover - collectives arrive with their own module
        return
    collectives.add_parser(sub)
    from . import topology

    topology.add_parser(sub)
    from . import serve

    serve.add_parser(sub)
    from . import memory

    memory.add_parser(sub)
