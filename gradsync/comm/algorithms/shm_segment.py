"""Shared-memory segments for the ranks of one host: mapping, naming, cleanup, waiting.

One segment per view (its members' tuple), cached on the group, in /dev/shm:

    [ flags (3, p, 8) int64 | slot 0 | slot 1 | ... | slot p-1 | out ]   slots and out: cap bytes

Each counter sits alone in a 64-byte cache line (flags[phase, rank, 0]), so a rank spinning
on one line does not bounce the line another rank is writing. Phase 0 counts arrivals (the
rank's slot holds call s's data), phase 1 counts "done reading the slots" of call s, phase 2
"done gathering" (the resident all-reduce of shared_buckets).
algorithms/shm.py builds the collectives on them.

The segment is created by the view's rank 0 and named over the existing point-to-point path
(int64 tensors, nothing unpickled), then unlinked as soon as every rank has said it mapped it (the
attach's last handshake): the mappings keep the memory alive and nothing is left in /dev/shm when a process
exits, even by SIGKILL. Only a kill inside that window leaves a name behind; the next
creation on the host removes ``gradsync-*`` names whose creator pid is dead.
"""

from __future__ import annotations

import mmap
import os
import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CommTimeoutError, PeerLostError
from ..p2p import P2P
from ..topology import host_key

SHM_DIR = "/dev/shm"
PREFIX = "gradsync-"
PHASES = 3                      # counters per rank: arrived, done, gathered
LINE = 64                       # bytes per cache line: one counter per line, slots aligned to it
MIN_CAPACITY = 64 << 10         # smallest slot; grows by powers of two
SPINS = 2000                    # busy checks (~0.2 us each) before the waiter yields its core
YIELD_S = 1e-3                  # then sched_yield for this long, then sleep up to MAX_PAUSE_S
MAX_PAUSE_S = 2.5e-4            # polls at >= 4 kHz: small next to a large call's copies
LIVENESS_EVERY_S = 0.1          # how often a sleeping waiter checks that laggards' pids exist


def fence() -> None:
    """A full memory barrier. x86 keeps ordinary stores in order, but large copies may use
    non-temporal stores, which are not; a lock round trip executes a locked instruction,
    which drains them before the flag store that follows."""
    lock = threading.Lock()
    lock.acquire()
    lock.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by someone else
        return True
    return True


def _pidns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def remove_stale(directory: str = SHM_DIR) -> list[str]:
    """Unlink ``gradsync-<port>-<pid>-<token>`` segments whose creator pid is dead; returns
    their names."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        parts = name.split("-")
        if not name.startswith(PREFIX) or len(parts) != 4 or not parts[2].isdigit():
            continue
        if not _pid_alive(int(parts[2])):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except OSError:
                pass
    return removed


@dataclass
class Segment:
    """This rank's mapping of one view's segment."""

    name: str
    capacity: int               # bytes per slot
    p: int
    data: torch.Tensor          # (header + (p + 1) * capacity,) uint8 over the mapping
    flags: np.ndarray           # (3, p, 8) int64: arrived, done, gathered; column 0 used
    pids: list[int]             # members' pids, for liveness checks; -1: another pid namespace
    seq: int = 0                # calls made on this segment
    retired: bool = False       # replaced by a bigger one or dropped: holders look again

    def __post_init__(self) -> None:
        # The counters as Python ints through a memoryview (flat int64 index of
        # flags[phase, rank, 0]): a read is ~50 ns, where numpy's min over a view is ~2 us,
        # and a small call spins on them dozens of times.
        self.counters = memoryview(self.flags.reshape(-1))
        self.lines = [[(phase * self.p + rank) * 8 for rank in range(self.p)]
                      for phase in range(PHASES)]
        self._views: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}
        # With more ranks than cores a spinning waiter holds the core a laggard needs:
        # yield at once instead (4 ranks on 2 cores: 1 KiB took ~1 ms a call spinning).
        self.spins = SPINS if self.p <= len(os.sched_getaffinity(0)) else 0
        # For the compiled small path (shm_fast.py): the mapping's address, slot 0's offset.
        self.base, self.header = self.data.data_ptr(), _header(self.p)
        self.cspins = 4096 if self.spins else 0     # paused checks in C before yielding

    def slot(self, i: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        """Slot ``i`` (i == p: the output area) as ``n`` elements of ``dtype``; the view is
        made once per shape (slicing and viewing cost a few us a call)."""
        key = (i, n, dtype)
        view = self._views.get(key)
        if view is None:
            if len(self._views) > 1024:   # a run of ever-new sizes does not grow it forever
                self._views.clear()
            start = _header(self.p) + i * self.capacity
            view = self._views[key] = self.data[start:start + n * dtype.itemsize].view(dtype)
        return view

    def post(self, phase: int, rank: int, seq: int) -> None:
        """Set ``rank``'s counter of ``phase`` to ``seq`` (after a fence: see :func:`fence`)."""
        fence()
        self.counters[self.lines[phase][rank]] = seq

    def reached(self, lines: list[int], seq: int) -> bool:
        counters = self.counters
        for line in lines:
            if counters[line] < seq:
                return False
        return True


def _header(p: int) -> int:
    return -(-PHASES * p * LINE // 4096) * 4096


def _map(name: str, p: int, capacity: int, create: bool) -> tuple[torch.Tensor, np.ndarray]:
    size = _header(p) + (p + 1) * capacity
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL if create else os.O_RDWR, 0o600)
    try:
        if create:
            os.ftruncate(fd, size)          # tmpfs: zero-filled, so every counter starts at 0
        mem = mmap.mmap(fd, size)
    finally:
        os.close(fd)                        # the mapping keeps the file open
    data = torch.frombuffer(mem, dtype=torch.uint8)
    flags = np.frombuffer(mem, dtype=np.int64, count=PHASES * p * 8).reshape(PHASES, p, 8)
    return data, flags


def attach(p2p: P2P, nbytes: int, old: Segment | None = None) -> Segment:
    """Create (view rank 0) or map (the others) a segment with slots of at least ``nbytes``
    (collective over the view; :func:`segment` caches one per view, shared_buckets keeps its
    own).

    Rank 0 gathers each member's (host key, pid, pid namespace) and answers everyone with
    all of them plus the segment's name and capacity, as int64 tensors.

    Raises:
        ValueError: a member is on another host.
    """
    p, r = p2p.size, p2p.rank
    capacity = max(MIN_CAPACITY, 1 << max(0, nbytes - 1).bit_length(),
                   old.capacity if old else 0)
    mine = torch.tensor([host_key(), os.getpid(), _pidns()], dtype=torch.int64)
    info = torch.zeros(3 * p + 3, dtype=torch.int64)   # (key, pid, pidns) * p, port, token, cap
    name = None
    if r == 0:
        info[0:3] = mine
        for peer in range(1, p):
            p2p.recv(info[3 * peer:3 * peer + 3], peer)
        keys = info[0:3 * p:3]
        if bool((keys == keys[0]).all()):
            remove_stale()
            port = int(os.environ.get("MASTER_PORT", "0"))
            token = secrets.randbits(48)
            name = f"{PREFIX}{port}-{os.getpid()}-{token:012x}"
            data, flags = _map(name, p, capacity, create=True)
            info[3 * p:] = torch.tensor([port, token, capacity])
        try:
            for peer in range(1, p):
                p2p.send(info, peer)
        except BaseException:
            if name is not None:
                os.unlink(os.path.join(SHM_DIR, name))
            raise
    else:
        p2p.send(mine, 0)
        p2p.recv(info, 0)
    triples = info[:3 * p].view(p, 3).tolist()
    elsewhere = [p2p.members[i] for i, t in enumerate(triples) if t[0] != triples[0][0]]
    if elsewhere:
        raise ValueError(f"shm needs every rank on one host; ranks "
                         f"{', '.join(map(str, elsewhere))} are elsewhere (not on rank "
                         f"{p2p.members[0]}'s host)")
    port, token, capacity = info[3 * p:].tolist()
    if r == 0:
        # Everyone says whether it mapped the name; then the name goes: the mappings keep
        # the memory alive, and nothing is left in /dev/shm whatever happens later.
        ack, failed = torch.zeros(1, dtype=torch.int64), []
        try:
            for peer in range(1, p):
                p2p.recv(ack, peer)
                if int(ack) != 1:
                    failed.append(p2p.members[peer])
        finally:
            os.unlink(os.path.join(SHM_DIR, name))
        if failed:
            raise ValueError(f"shm: rank {', '.join(map(str, failed))} cannot map "
                             f"{SHM_DIR}/{name} made by rank {p2p.members[0]}; the ranks "
                             f"need one /dev/shm")
    else:
        name = f"{PREFIX}{port}-{triples[0][1]}-{token:012x}"
        try:
            data, flags = _map(name, p, capacity, create=False)
        except FileNotFoundError:
            p2p.send(torch.zeros(1, dtype=torch.int64), 0)
            raise ValueError(f"shm: rank {p2p.group.rank} cannot see {SHM_DIR}/{name} made by "
                             f"rank {p2p.members[0]}; the ranks need one /dev/shm") from None
        p2p.send(torch.ones(1, dtype=torch.int64), 0)
    pids = [pid if ns == _pidns() else -1 for _, pid, ns in triples]
    return Segment(name, capacity, p, data, flags, pids)


def wait_for(seg: Segment, phase: int, seq: int, p2p: P2P, only: int | None = None) -> None:
    """Wait until every member's counter of ``phase`` (or only position ``only``'s)
    reached ``seq``.

    Spins first (a call between two ranks is a few microseconds), then yields, then sleeps
    with a growing pause, so that with more ranks than cores the waiting ranks leave the
    cores to the ones still copying.

    Raises:
        CommTimeoutError: past the group's timeout; names the ranks that lag.
        PeerLostError: a lagging member's process is gone.
    """
    lines = seg.lines[phase] if only is None else [seg.lines[phase][only]]
    positions = range(seg.p) if only is None else [only]
    reached = seg.reached
    for _ in range(seg.spins):
        if reached(lines, seq):
            return
    start = time.monotonic()
    deadline = start + p2p.group.timeout_s
    pause, last_check = 1e-5, start
    while not reached(lines, seq):
        now = time.monotonic()
        lagging = [i for k, i in enumerate(positions) if seg.counters[lines[k]] < seq]
        if now - last_check > LIVENESS_EVERY_S:
            last_check = now
            gone = [p2p.members[i] for i in lagging if seg.pids[i] > 0
                    and not _pid_alive(seg.pids[i])]
            if gone:
                raise PeerLostError(f"rank {p2p.group.rank}: lost rank "
                                    f"{', '.join(map(str, gone))} during {p2p.what}")
        if now > deadline:
            names = ", ".join(str(p2p.members[i]) for i in lagging)
            raise CommTimeoutError(f"rank {p2p.group.rank}: {p2p.what} timed out waiting for "
                                   f"rank {names} (no arrival in {p2p.group.timeout_s:g} s)")
        if now - start < YIELD_S:
            os.sched_yield()
        else:
            time.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE_S)


def segment(p2p: P2P, nbytes: int) -> Segment:
    """The view's segment, cached on the group per member tuple; replaced by a bigger one
    when ``nbytes`` outgrows it (every rank sees the same size, so all replace together)."""
    cache = p2p.group.__dict__.setdefault("_shm_segments", {})
    seg = cache.get(p2p.members)
    if seg is None or seg.capacity < nbytes:
        old = cache.pop(p2p.members, None)
        if old is not None:
            old.retired = True
        seg = attach(p2p, nbytes, seg)
        cache[p2p.members] = seg
    return seg


def drop(p2p: P2P) -> None:
    """Forget the view's segment after a failed call: a later call makes a new one."""
    seg = p2p.group.__dict__.get("_shm_segments", {}).pop(p2p.members, None)
    if seg is not None:
        seg.retired = True
