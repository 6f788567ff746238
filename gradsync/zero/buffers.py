"""Persistent buffers that ZeRO's full-size transient tensors borrow instead of allocating.

Stages 2-3 make full-size (N * k,) tensors that live for a moment, several per layer per
step: stage 3's gathered parameters (twice per layer: forward and backward) and the
gradient bucket while it fills (stages 2-3). Allocated and freed each time, each block (16
MiB for a 2048 x 2048 Linear) goes to glibc's malloc, which raises its mmap threshold to the
size of the first such block freed and from then on serves them from its heap, where the
holes they leave are kept and fragmented by the smaller blocks between them: measured with
glibc's defaults, stage 3 peaked above DataParallel per rank and trained a smaller model
under a memory limit (docs/benchmarks.md section 17). Borrowed buffers are made once and
reused every step, as FSDP's caching allocator keeps blocks on GPUs, so they leave no holes.
Setting the threshold for the whole process (``MALLOC_MMAP_THRESHOLD_``) would also return
the blocks, but slows everything else in the process (DataParallel 0.67x).

The full-size transients that are not gradsync's own (autograd's gradient of a layer, comm's
staging copy of a bucket, gloo's flat output of an all-gather) still leave such holes, so
stage 3 also hands the free pages of glibc's heaps back with ``malloc_trim(0)``
(:class:`HoleWatch`), only once the process has grown within a step: a one-off call, not a
setting, made only by stage 3. Measured with glibc's defaults (52 M parameters, 4 ranks),
stage 3's peak per rank above the process's start went from 976 to 508 MiB (the buffers
alone: 890), and the largest MLP it trains under 3000 MiB from 22.6 M to 60.4 M
parameters (DataParallel: 26.8 M); docs/benchmarks.md section 17.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

from .layout import ShardedBucket


class GatherBuffers:
    """Persistent buffers that gathered buckets borrow, FSDP's caching allocator in small.

    A buffer is an untyped storage of ``nbytes`` (the largest bucket's) made when a gather
    finds none free, kept after, at most ``limit`` of them (the buckets gathered at once:
    this unit's, the prefetched one's, and in backward the one whose gradient is still
    being reduced). A bucket borrows one by swapping memory with its flat storage
    (``_swap_data_ptr_``: the storage object, and so every view autograd saved of it, stays
    the same; only whose memory it holds changes) and gives it back by swapping again, so
    no allocation happens after the first step. Past ``limit`` (``gathered()`` gathers all
    buckets at once) or for a bucket larger than ``nbytes`` the storage is resized as before.
    """

    def __init__(self, nbytes: int, limit: int):
        self.nbytes, self.limit = nbytes, limit
        self._free: list[torch.UntypedStorage] = []
        self.made = 0
        self.resized = 0  # gathers that allocated their own storage (pool empty or too small)

    def lend(self, storage: torch.UntypedStorage) -> torch.UntypedStorage | None:
        """Swap a buffer's memory into the empty ``storage``; the (empty) shell to give
        back, or None when there is none to lend."""
        if not hasattr(storage, "_swap_data_ptr_"):  # torch's private API is gone: resize
            return None
        if self._free:
            shell = self._free.pop()
        elif self.made < self.limit:
            shell, self.made = torch.UntypedStorage(self.nbytes), self.made + 1
        else:
            return None
        storage._swap_data_ptr_(shell)  # storage: the buffer's memory; shell: 0 bytes
        return shell

    def take_back(self, storage: torch.UntypedStorage, shell: torch.UntypedStorage) -> None:
        storage._swap_data_ptr_(shell)  # the buffer's memory back into the shell
        self._free.append(shell)


class FillBuffers:
    """The gradient buckets of stages 2-3 while they fill: ``count`` persistent (M,) tensors
    per dtype (M: the largest bucket's N * k) lent to one bucket each, from its first
    gradient until its reduce-scatter has copied it into comm's staging (at launch).

    Backward fills the buckets in launch order, one at a time unless a layer's gradients
    arrive out of order, so two per dtype are enough; a bucket that finds none free gets a
    tensor of its own, as before. The memory is persistent (one or two largest buckets per
    rank), not model state.
    """

    def __init__(self, buckets: list[ShardedBucket], count: int = 2):
        self.count = count
        self._numel: dict[torch.dtype, int] = {}
        for b in buckets:
            self._numel[b.flat.dtype] = max(self._numel.get(b.flat.dtype, 0), b.flat.numel())
        self._free: dict[torch.dtype, list[torch.Tensor]] = {d: [] for d in self._numel}
        self._made = dict.fromkeys(self._numel, 0)
        self._lent: dict[int, torch.Tensor] = {}  # bucket index -> the whole buffer

    def take(self, b: ShardedBucket) -> torch.Tensor:
        """(N * k,) uninitialised: a view of a free buffer, or a tensor of its own."""
        dtype, free = b.flat.dtype, self._free[b.flat.dtype]
        if free:
            buf = free.pop()
        elif self._made[dtype] < self.count:
            buf = torch.empty(self._numel[dtype], dtype=dtype, device=b.flat.device)
            self._made[dtype] += 1
        else:
            return torch.empty_like(b.flat)
        self._lent[b.index] = buf
        return buf[:b.flat.numel()]

    def give_back(self, b: ShardedBucket) -> None:
        """Bucket ``b`` no longer uses what :meth:`take` gave it (no-op if its own)."""
        buf = self._lent.pop(b.index, None)
        if buf is not None:
            self._free[b.flat.dtype].append(buf)


def _glibc():
    """glibc's (malloc_trim,), or None (another libc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return (libc.malloc_trim,)
    except (OSError, AttributeError):
        return None


_GLIBC = _glibc()


def resident_bytes() -> int:
    """This process's resident memory (VmRSS), from /proc/self/statm; 0 where unreadable."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_free_pages() -> bool:
    """Give the free pages inside glibc's heaps back to the system (``malloc_trim(0)``:
    ``madvise(MADV_DONTNEED)`` on free chunks; the heap's layout and settings stay as they
    are). Whatever is given back is faulted in and zeroed again when reused, which is the
    cost of a fixed mmap threshold, so callers do it only once holes have piled up
    (:class:`HoleWatch`). Returns whether it trimmed; a no-op without glibc."""
    if _GLIBC is None:
        return False
    _GLIBC[0](0)
    return True


class HoleWatch:
    """Return glibc's free pages once the process has grown ``slack`` bytes within a step
    (since :meth:`start`, or the last trim): steady steps, whose transients reuse the same
    holes, never trim (no page is faulted in twice), and what other code does between the
    steps is not counted; a step that piles up new holes trims every ``slack`` bytes."""

    def __init__(self, slack: int):
        self.slack, self.trims = slack, 0
        self._mark = resident_bytes()

    def start(self) -> None:
        self._mark = resident_bytes()

    def check(self) -> None:
        if resident_bytes() > self._mark + self.slack and release_free_pages():
            self.trims += 1
            self._mark = resident_bytes()
