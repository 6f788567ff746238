"""horovodrun's common flags on `gradsync run`, mapped onto the launcher's own config.

    gradsync run -np 4 train.py                        # = --nproc-per-node 4
    gradsync run -np 4 -H localhost:4 train.py         # the same: one host, 4 slots
    gradsync run -H h0:2,h1:2,h2:2 train.py            # = --lab 3 --procs-per-host 2
    gradsync run -np 3 --min-np 2 train.py             # = --elastic --nproc-per-node 3
                                                       #   --min-workers 2
    gradsync run -np 2 --timeline-filename t.json t.py # = --timeline t.json

Hosts: this machine (``localhost``, ``127.0.0.1``, its host name) runs the ranks here; the
emulated hosts of a lab are named ``h0``, ``h1``, ... (gradsync/lab), so ``-H h0:2,h1:2``
runs a 2-host lab. Other hosts are refused in one line: gradsync does not start ranks over
ssh (run ``gradsync run --nnodes N --node-rank I`` on each host instead). ``--max-np``
cannot exceed ``-np``: the elastic launcher replaces lost workers, it does not add more.
``-np`` and ``-H`` are spelled ``--num-proc`` and ``--hosts`` after
:func:`gradsync.run.cli.normalize_argv`. No torch import.
"""

from __future__ import annotations

import dataclasses
import re
import socket
from dataclasses import dataclass, field

from ..flags import at_least as _at_least
from ..flags import flag_meta as _help

SHORT = {"-np": "--num-proc", "-H": "--hosts"}  # horovodrun's short flags
_LOCAL = {"localhost", "127.0.0.1", "::1"}
_LAB_HOST = re.compile(r"h(\d+)")


@dataclass
class HorovodRunConfig:
    """horovodrun's flags (mapped onto the ones above)."""

    num_proc: int | None = field(default=None, metadata=_help(
        "horovodrun's -np: the number of ranks (default: the slots of -H)"))
    hosts: str | None = field(default=None, metadata=_help(
        "horovodrun's -H: HOST:SLOTS,... (localhost, or a lab's h0,h1,...)"))
    hostfile: str | None = field(default=None, metadata=_help(
        "horovodrun's hostfile: one 'HOST slots=N' (or HOST:N) per line"))
    min_np: int | None = field(default=None, metadata=_help(
        "elastic: the fewest ranks the run goes on with (= --elastic --min-workers)"))
    max_np: int | None = field(default=None, metadata=_help(
        "elastic: the most ranks (at most -np: lost ranks are replaced, none added)"))
    timeline_filename: str | None = field(default=None, metadata=_help(
        "= --timeline FILE"))

    def __post_init__(self) -> None:
        _at_least(self.num_proc, 1, "num-proc")
        _at_least(self.min_np, 1, "min-np")
        _at_least(self.max_np, 1, "max-np")
        if self.hosts is not None and self.hostfile is not None:
            raise ValueError("pass either -H or --hostfile, not both")

    def given(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))


def parse_hosts(text: str) -> list[tuple[str, int]]:
    """``a:2,b:4`` (a host without ``:N`` has 1 slot) -> [(a, 2), (b, 4)].

    Raises:
        ValueError: an empty list, a bad slot count, or a host named twice.
    """
    hosts = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, slots = item.rpartition(":") if ":" in item else (item, "", "1")
        if not name or not slots.isdigit() or int(slots) < 1:
            raise ValueError(f"-H: {item!r} is not HOST:SLOTS with SLOTS >= 1")
        hosts.append((name, int(slots)))
    names = [h for h, _ in hosts]
    if not hosts or len(set(names)) != len(names):
        raise ValueError(f"-H needs HOST:SLOTS,... with each host once, got {text!r}")
    return hosts


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """horovodrun's hostfile: ``HOST slots=N`` or ``HOST:N`` per line, ``#`` comments."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.split("#")[0].strip() for ln in f]
    except OSError as exc:
        raise ValueError(f"--hostfile {path}: {exc.strerror or exc}") from None
    items = []
    for line in filter(None, lines):
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        items.append(f"{m.group(1)}:{m.group(2)}" if m else line)
    if not items:
        raise ValueError(f"--hostfile {path} lists no host")
    return parse_hosts(",".join(items))


def _placement(hosts: list[tuple[str, int]], num_proc: int | None) -> dict:
    """The RunConfig fields that run ``num_proc`` ranks on ``hosts``."""
    names = [h for h, _ in hosts]
    total = sum(s for _, s in hosts)
    here = _LOCAL | {socket.gethostname()}
    if num_proc is not None and num_proc > total:
        raise ValueError(f"-np {num_proc} is more than the {total} slots of the hosts")
    if len(hosts) == 1 and names[0] in here:
        return {"nproc_per_node": num_proc or total}
    lab = [_LAB_HOST.fullmatch(h) for h in names]
    if all(lab):
        if sorted(int(m.group(1)) for m in lab) != list(range(len(hosts))):
            raise ValueError(f"-H: a lab of {len(hosts)} hosts is h0..h{len(hosts) - 1}, got "
                             f"{', '.join(names)}")
        slots = {s for _, s in hosts}
        if len(slots) != 1 or (num_proc is not None and num_proc != total):
            raise ValueError("a lab runs the same number of ranks on every host: give each "
                             "of h0..hN-1 the same slots, and -np their sum (or no -np)")
        return {"lab_hosts": len(hosts), "procs_per_host": slots.pop()}
    other = [h for h in names if h not in here and not _LAB_HOST.fullmatch(h)]
    raise ValueError(f"-H: gradsync run starts ranks on this machine (localhost) or in an "
                     f"emulated lab (hosts h0,h1,...), not over ssh on {', '.join(other or names)}"
                     f": run `gradsync run --nnodes N --node-rank I --master-addr HOST0` on "
                     "each host instead")


def resolve(config):
    """``config`` (a RunConfig) with horovodrun's flags turned into its own; the same
    config when none was given.

    Raises:
        ValueError: one line naming the flag (a placement gradsync cannot run, -np against
            --nproc-per-node, --max-np above -np).
    """
    hv = config.horovod
    if not hv.given():
        return config
    hosts = (parse_hosts(hv.hosts) if hv.hosts is not None else
             read_hostfile(hv.hostfile) if hv.hostfile is not None else None)
    if hosts is not None:
        place = _placement(hosts, hv.num_proc)
    else:
        place = {} if hv.num_proc is None else {"nproc_per_node": hv.num_proc}
    changes: dict = {"horovod": HorovodRunConfig()}
    if "nproc_per_node" in place:
        if config.nproc_per_node not in (1, place["nproc_per_node"]):
            raise ValueError(f"-np/-H give {place['nproc_per_node']} ranks, --nproc-per-node "
                             f"{config.nproc_per_node}: pass one of them")
        changes["nproc_per_node"] = place["nproc_per_node"]
    if "lab_hosts" in place:
        changes["lab"] = dataclasses.replace(config.lab, hosts=place["lab_hosts"],
                                             procs_per_host=place["procs_per_host"])
    workers = changes.get("nproc_per_node", config.nproc_per_node)
    if hv.max_np is not None and hv.max_np < workers:
        raise ValueError(f"--max-np {hv.max_np} is less than -np {workers}")
    if hv.max_np is not None and hv.max_np > workers:
        raise ValueError(f"--max-np {hv.max_np} above -np {workers}: gradsync's elastic "
                         "launcher replaces lost workers but does not add more; pass -np "
                         f"{hv.max_np}")
    if hv.min_np is not None or hv.max_np is not None:
        changes["elastic"] = dataclasses.replace(config.elastic, elastic=True,
                                                 min_workers=hv.min_np or
                                                 config.elastic.min_workers)
    if hv.timeline_filename is not None:
        if config.timeline not in (None, hv.timeline_filename):
            raise ValueError("pass either --timeline or --timeline-filename, not both")
        changes["timeline"] = hv.timeline_filename
    return dataclasses.replace(config, **changes)
