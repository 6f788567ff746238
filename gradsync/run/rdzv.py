"""`gradsync rdzv`: the rendezvous service of an elastic job across hosts (comm/rendezvous.py).

    gradsync rdzv --endpoint 10.0.0.1:29400 --nnodes 2:3 --min-workers 2
    # then on each training host:
    gradsync run --elastic --rdzv-endpoint 10.0.0.1:29400 --nproc-per-node 2 train.py

It listens on the endpoint's address only, forms the first generation from the first hosts
(``--nnodes MIN:MAX``: at least MIN, at most MAX training at once, later ones join), and
runs until every host has ended: exit 0 when the run completed, 1 when it stopped (too few
workers), 2 on a usage error. Run it on a machine that does not train: it is the job's one
single point of failure, as torchrun's c10d rendezvous host is.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from ..exits import UserError
from ..flags import add_dataclass_arguments, config_from_args
from ..flags import flag_meta as _help
from ..net import parse_endpoint


def parse_nnodes(text: str) -> tuple[int, int]:
    """``N`` or ``MIN:MAX`` -> (min, max), as torchrun's --nnodes."""
    low, _, high = text.partition(":")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise ValueError(f"--nnodes must be N or MIN:MAX, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"--nnodes needs 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


@dataclass
class RdzvConfig:
    """The rendezvous service of an elastic job across hosts."""

    endpoint: str = field(default="", metadata=_help(
        "HOST:PORT to listen on (that address only); the agents' --rdzv-endpoint"))
    nnodes: str = field(default="1", metadata=_help(
        "hosts: N, or MIN:MAX (start with MIN or more, at most MAX train at once)"))
    min_workers: int = field(default=1, metadata=_help(
        "the fewest workers the run goes on with"))
    last_call: float = field(default=2.0, metadata=_help(
        "seconds the first generation waits for more hosts once MIN have come"))
    timeout: float = field(default=300.0, metadata=_help(
        "seconds to wait for the first hosts, and a new worker's first heartbeat"))
    out: str | None = field(default=None, metadata=_help(
        "write the generations (who left and joined, when) to this JSON file"))

    def __post_init__(self) -> None:
        if not self.endpoint:
            raise ValueError("--endpoint HOST:PORT is required")
        parse_endpoint(self.endpoint, "--endpoint")
        parse_nnodes(self.nnodes)
        if self.min_workers < 1:
            raise ValueError(f"--min-workers must be at least 1, got {self.min_workers}")
        if not (self.last_call >= 0 and self.timeout > 0):
            raise ValueError("--last-call must be >= 0 and --timeout > 0 seconds")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "rdzv", help="the rendezvous service of an elastic job across hosts",
        description="Serve the store and the membership of an elastic job whose hosts run "
                    "`gradsync run --elastic --rdzv-endpoint HOST:PORT` (or `gradsync train "
                    "--elastic --rdzv-endpoint`).")
    add_dataclass_arguments(p, RdzvConfig)
    return p


def main(args: argparse.Namespace) -> int:
    from ..comm.rendezvous import RendezvousService

    config = config_from_args(RdzvConfig, args)
    host, port = parse_endpoint(config.endpoint, "--endpoint")
    low, high = parse_nnodes(config.nnodes)
    try:
        service = RendezvousService(host, port, low, high, config.min_workers,
                                    timeout_s=config.timeout, last_call_s=config.last_call)
    except (OSError, RuntimeError) as exc:
        raise UserError(f"cannot listen on {config.endpoint}: {exc}") from None
    try:
        code = service.serve()
    except TimeoutError as exc:
        raise UserError(str(exc)) from None
    finally:
        if config.out:
            with open(config.out, "w") as f:
                json.dump({"generations": service.generations}, f, indent=1)
    return code
