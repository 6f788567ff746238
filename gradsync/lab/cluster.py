"""The Lab: N emulated hosts on one Linux machine, joined by a switch, links shaped by tc.

    with up(hosts=3, rate="200mbit") as lab:   # namespaces gs-1a2b-h0..h2 and gs-1a2b-sw
        lab_launch(lab, ["train"])               # hosts at 10.213.X.1 .. 10.213.X.3
                                                 # everything is gone here

Host i is namespace P-h{i} (P the lab's unique prefix) with interface P-h{i}, one end of a
veth whose other end P-s{i} is a port of bridge P-br in the switch namespace P-sw. Both ends
have a tbf on their egress, so the link is shaped in both directions (docs/lab.md says why
tbf and not netem). The state file ``$GRADSYNC_LAB_DIR/<name>.json`` (default
/run/gradsync/labs) is written *before* anything is created, so ``down`` from another
command, or after a crash, finds every namespace; deleting them removes everything else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from . import cpu, netns, network
from .netns import LabError, parse_rate

DEFAULT_LAB_DIR = "/run/gradsync/labs"
_BASE = "10.213"  # labs take 10.213.X.0/24, X = 0..255
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_MAX_HOSTS = 200  # host i is .i+1; names like gs-1a2b-h199 still fit IFNAMSIZ (15)


def lab_dir() -> Path:
    """Where the labs' state files live (``GRADSYNC_LAB_DIR`` overrides the default)."""
    return Path(os.environ.get("GRADSYNC_LAB_DIR") or DEFAULT_LAB_DIR)


@dataclass(frozen=True)
class Host:
    """One emulated host: a namespace with one interface into the switch."""

    index: int
    ns: str
    """Network namespace; run a command there with ``ip netns exec NS ...``."""
    ifname: str
    """The host's interface inside ``ns`` (what GLOO_SOCKET_IFNAME names)."""
    port: str
    """The other end of the veth, a port of the bridge in the switch namespace."""
    addr: str
    rate: int
    """Link rate in bits/s, enforced in both directions."""
    cpus: float | None = None
    """CPU cap in cores for all the host's processes together (None: uncapped)."""
    cgroup: str | None = None
    """The cgroup that enforces ``cpus`` (gradsync/lab/cpu.py), None when uncapped."""


@dataclass
class Lab:
    """A lab that is up (or being created). ``with lab:`` takes it down on exit."""

    name: str
    prefix: str
    subnet: str
    switch_ns: str
    bridge: str
    hosts: list[Host]
    procs_per_host: int = 1
    state: str = "up"
    """"creating" until every piece exists, then "up"."""
    state_path: Path = field(default_factory=Path, compare=False)

    @property
    def world_size(self) -> int:
        return len(self.hosts) * self.procs_per_host

    def links(self) -> list[tuple[str, tuple[int, ...], float]]:
        """Each host's (name, ranks, link rate in bytes/s), ranks as `lab_launch` places them
        (the fields of a :class:`gradsync.comm.HostLink`; no torch here)."""
        per = self.procs_per_host
        return [(f"h{h.index}", tuple(range(i * per, (i + 1) * per)), h.rate / 8)
                for i, h in enumerate(self.hosts)]

    @property
    def master_addr(self) -> str:
        return self.hosts[0].addr

    def namespaces(self) -> list[str]:
        return [h.ns for h in self.hosts] + [self.switch_ns]

    def exec_argv(self, host: int, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``host``'s namespace (``ip netns exec NS argv...``),
        and inside its CPU cap's cgroup when it has one."""
        h = self.hosts[host]
        inside = ["ip", "netns", "exec", h.ns, *argv]
        # The cgroup is joined before: `ip netns exec` mounts a fresh /sys, without cgroups.
        return cpu.join_argv(h.cgroup, inside) if h.cgroup else inside

    def alive(self) -> bool:
        """True if every namespace of the lab exists."""
        existing = set(netns.list_netns())
        return all(ns in existing for ns in self.namespaces())

    def down(self) -> None:
        """Remove the lab's namespaces and state file; safe to call more than once."""
        network.destroy(self)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        del data["state_path"]
        return data

    @classmethod
    def from_json(cls, data: dict, state_path: Path) -> Lab:
        hosts = [Host(**h) for h in data.pop("hosts")]
        return cls(hosts=hosts, state_path=state_path, **data)


@contextlib.contextmanager
def _locked():
    """Serialise allocation of names and subnets between concurrent ``up``/``down``."""
    directory = lab_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LabError(f"cannot use the lab state directory {directory}: "
                       f"{exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield directory
    finally:
        os.close(fd)


def _write_state(lab: Lab) -> None:
    tmp = lab.state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(lab.to_json(), indent=1) + "\n")
    os.replace(tmp, lab.state_path)


def _load(path: Path) -> Lab | None:
    try:
        return Lab.from_json(json.loads(path.read_text()), path)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def status() -> list[Lab]:
    """The labs recorded in the state directory, by name (``lab.alive()`` tells if intact)."""
    directory = lab_dir()
    if not directory.is_dir():
        return []
    labs = [_load(p) for p in sorted(directory.glob("*.json"))]
    return [lab for lab in labs if lab is not None]


def current() -> Lab | None:
    """The lab this process runs in (``gradsync lab run`` sets GRADSYNC_LAB), or None when
    it runs in none or that lab is gone."""
    name = os.environ.get("GRADSYNC_LAB")
    if not name:
        return None
    try:
        return get(name)
    except LabError:
        return None


def get(name: str | None = None) -> Lab:
    """The lab called ``name``, or the only lab when ``name`` is None.

    Raises:
        LabError: no such lab, no lab at all, or several labs and no name.
    """
    labs = status()
    if name is not None:
        for lab in labs:
            if lab.name == name:
                return lab
        raise LabError(f"no lab named {name!r} is up"
                       + (f" (labs: {', '.join(l.name for l in labs)})" if labs else ""))
    if not labs:
        raise LabError("no lab is up; start one with `gradsync lab up --hosts N`")
    if len(labs) > 1:
        raise LabError(f"{len(labs)} labs are up ({', '.join(l.name for l in labs)}); "
                       "choose one with --name")
    return labs[0]


def _pick_prefix(existing_ns: list[str]) -> str:
    for _ in range(100):
        prefix = f"gs-{secrets.token_hex(2)}"
        if not any(ns.startswith(prefix + "-") for ns in existing_ns):
            return prefix
    raise LabError("cannot find an unused lab prefix gs-XXXX; remove stale namespaces")


def _pick_subnet(labs: list[Lab]) -> str:
    taken = {lab.subnet for lab in labs}
    used = netns.used_ipv4_networks()
    for x in range(256):
        net = ipaddress.IPv4Network(f"{_BASE}.{x}.0/24")
        if str(net) not in taken and not any(net.overlaps(u) for u in used):
            return str(net)
    raise LabError(f"no free subnet left in {_BASE}.0.0/16 for a new lab")


def _plan(hosts: int, rates: list[int], procs_per_host: int, name: str | None,
          directory: Path, cpus: list[float | None]) -> Lab:
    labs = status()
    existing_ns = netns.list_netns()
    prefix = _pick_prefix(existing_ns)
    name = name or prefix
    for lab in labs:
        if lab.name != name:
            continue
        if any(ns in existing_ns for ns in lab.namespaces()):
            raise LabError(f"a lab named {name!r} is already up ({len(lab.hosts)} hosts, "
                           f"{lab.subnet}); take it down with `gradsync lab down --name {name}`")
        labs.remove(lab)  # a stale record (its namespaces are gone): reuse the name
    net = ipaddress.IPv4Network(_pick_subnet(labs))
    host_list = [Host(index=i, ns=f"{prefix}-h{i}", ifname=f"{prefix}-h{i}",
                      port=f"{prefix}-s{i}", addr=str(net[i + 1]), rate=rates[i],
                      cpus=cpus[i], cgroup=cpu.cap_path(f"{prefix}-h{i}") if cpus[i] else None)
                 for i in range(hosts)]
    return Lab(name=name, prefix=prefix, subnet=str(net), switch_ns=f"{prefix}-sw",
               bridge=f"{prefix}-br", hosts=host_list, procs_per_host=procs_per_host,
               state="creating", state_path=directory / f"{name}.json")


def up(hosts: int, rate: str = "1gbit", rates: list[str] | None = None,
       procs_per_host: int = 1, name: str | None = None, cpus: str | None = None) -> Lab:
    """Create a lab of ``hosts`` emulated hosts whose links run at ``rate`` each way.

    Args:
        hosts: number of hosts (1-200).
        rate: every host's link rate, tc-style ("1gbit", "250mbit").
        rates: one rate per host instead, for unequal links.
        procs_per_host: process slots per host, for :func:`~gradsync.lab.run.lab_launch`.
        name: the lab's name; default its unique prefix (``gs-XXXX``).
        cpus: per-host CPU caps in cores, "0.5,max,max" (gradsync/lab/cpu.py); one value
            caps every host; None or "max": uncapped.

    Returns:
        The :class:`Lab`, recorded in the state directory; use it as a context manager.

    Raises:
        LabError: not root, no ip/tc, no cgroups for ``cpus``, bad arguments, a lab of that name is already up, or a
            command failed (everything created so far is removed first).
    """
    if not 1 <= hosts <= _MAX_HOSTS:
        raise LabError(f"--hosts must be between 1 and {_MAX_HOSTS}, got {hosts}")
    if procs_per_host < 1:
        raise LabError(f"--procs-per-host must be at least 1, got {procs_per_host}")
    if name is not None and not _NAME_RE.match(name):
        raise LabError(f"bad lab name {name!r}: use up to 32 letters, digits, '.', '_' or '-'")
    if rates is not None and len(rates) != hosts:
        raise LabError(f"--rates gives {len(rates)} rates for {hosts} hosts; give one per host")
    bits = [parse_rate(r) for r in rates] if rates is not None else [parse_rate(rate)] * hosts
    caps = cpu.parse_cpus(cpus, hosts) if cpus else [None] * hosts
    if any(caps):
        cpu.cgroup_root()  # no cgroups: one line before anything is created
    netns.check_tools()  # after the arguments: a typo is reported the same for everyone
    with _locked() as directory:
        lab = _plan(hosts, bits, procs_per_host, name, directory, caps)
        _write_state(lab)  # first, so that a crash from here on leaves a record to clean up
    try:
        network.create(lab)
        lab.state = "up"
        _write_state(lab)
    except BaseException:
        network.destroy(lab)
        raise
    return lab


def down(name: str) -> bool:
    """Take the lab ``name`` down; True if it existed. Idempotent.

    Raises:
        LabError: not root / no ip, or a namespace could not be deleted.
    """
    netns.check_tools()
    with _locked():
        for lab in status():
            if lab.name == name:
                network.destroy(lab)
                return True
    return False

