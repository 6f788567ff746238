"""The one table of gradient compressors, and ``--compression`` specs parsed once.

``--compression none|fp16|bf16|topk:RATIO|powersgd:RANK`` is parsed once, by the config,
into a :class:`Compression`; that object travels to whatever needs it (the all-reduce hook
below, the parameter server's pushes and its servers). Everything that lists compressors
derives from :data:`REGISTRY`: the parser, the CLI help, which ones the parameter server
pushes, which ones torch's DDP has a hook of its own for. A new compressor is one file in
this folder (``name(arg, group) -> (state, hook)``) plus one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from .. import comm
from .bucket import GradBucket
from .cast import CastState, cast_hook, half_dtype
from .default import HookState, allreduce_hook

# What the warm-up steps (before a compressor starts) may send: "none" is the bucket as it is.
WARMUP_COMPRESSIONS = ("none", "fp16", "bf16")


def _ratio(text: str) -> float:
    try:
        ratio = float(text)
    except ValueError:
        raise ValueError("topk needs a ratio") from None
    if not 0 < ratio < 1:
        raise ValueError("the top-k ratio must be between 0 and 1 (exclusive)")
    return ratio


def _rank(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError("powersgd needs a rank >= 1")
    return int(text)


@dataclass(frozen=True)
class Compressor:
    """One compressor.

    Args:
        name: what users pass, before the colon.
        build: "module:function" in this package; ``function(arg, group)`` (no ``arg`` for
            a compressor without one) returns ``(state, hook)`` for
            ``DataParallel.register_comm_hook``; None: no hook (plain averaging).
        arg: what its number is called in the help ("RATIO"), None: it takes none.
        parse_arg: the number from its text; ValueError saying what it must be otherwise.
        example: a valid spec, shown when one is wrong.
        ps: the parameter server can push with it.
        torch_hook: torch's DDP has a hook of its own for it (``--arch ddp``).
    """

    name: str
    build: str | None
    arg: str | None = None
    parse_arg: Callable[[str], float] | None = None
    example: str = ""
    ps: bool = True
    torch_hook: bool = False


REGISTRY: dict[str, Compressor] = {c.name: c for c in (
    Compressor("none", None, torch_hook=True),
    Compressor("fp16", "cast:cast", torch_hook=True),
    Compressor("bf16", "cast:cast", torch_hook=True),
    Compressor("topk", "topk:topk", "RATIO", _ratio, "topk:0.01"),
    # Its low-rank factors need an all-reduce among the workers: no parameter server.
    Compressor("powersgd", "powersgd:powersgd", "RANK", _rank, "powersgd:2", ps=False,
               torch_hook=True),
)}

COMPRESSORS = tuple(f"{c.name}:{c.arg}" if c.arg else c.name for c in REGISTRY.values())


@dataclass(frozen=True)
class Compression:
    """A parsed spec: ``name`` and its number (the top-k ratio, the PowerSGD rank)."""

    name: str
    arg: float | None = None

    def __str__(self) -> str:
        if self.arg is None:
            return self.name
        return f"{self.name}:{self.arg:g}"

    @property
    def compressor(self) -> Compressor:
        return REGISTRY[self.name]


def parse(spec: "str | Compression") -> Compression:
    """The spec as a :class:`Compression` (one already parsed is returned as it is);
    ValueError naming what is wrong otherwise."""
    if isinstance(spec, Compression):
        return spec
    name, _, text = spec.strip().partition(":")
    entry = REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"--compression {spec!r}: unknown compressor; choose one of "
                         f"{', '.join(COMPRESSORS)}")
    if entry.parse_arg is None:
        if text:
            raise ValueError(f"--compression {spec!r}: {name} takes no argument")
        return Compression(name)
    try:
        return Compression(name, entry.parse_arg(text))
    except ValueError as exc:  # the message names the bound
        raise ValueError(f"--compression {spec!r}: {exc}, e.g. {entry.example}") from None


@dataclass
class WarmupState:
    """``plain_hook`` (with ``plain``'s state: a plain or half-precision all-reduce) for the
    first ``steps`` steps, then ``inner``."""

    steps: int
    inner_state: object
    inner: object
    plain: HookState
    plain_hook: Callable = allreduce_hook
    step: int = 0

    @property
    def stats(self):
        return self.inner_state.stats


def warmup_hook(state: WarmupState, bucket: GradBucket):
    warm = state.step < state.steps
    if bucket.is_last():
        state.step += 1
    if warm:
        return state.plain_hook(state.plain, bucket)
    return state.inner(state.inner_state, bucket)


def check_warmup_compression(name: str) -> str:
    """``name`` if the warm-up steps can send it; ValueError naming the choices otherwise."""
    if name not in WARMUP_COMPRESSIONS:
        raise ValueError(f"--warmup-compression {name!r}: choose one of "
                         f"{', '.join(WARMUP_COMPRESSIONS)}")
    return name


def make_hook(compression: Compression | str, group: comm.Group | None = None,
              warmup: int = 0, algorithm: str = "auto",
              warmup_compression: str = "none") -> tuple[object, object] | None:
    """(state, hook) for ``DataParallel.register_comm_hook``, or None for ``none``;
    ``algorithm``: the all-reduce the hook's collectives run (the run's --algorithm);
    ``warmup_compression``: fp16 or bf16 casts the ``warmup`` steps' buckets (half their
    bytes, when they are the largest part of a run that compresses afterwards)."""
    compression = parse(compression)
    check_warmup_compression(warmup_compression)
    entry = compression.compressor
    if entry.build is None:
        return None
    module, _, function = entry.build.partition(":")
    factory = getattr(importlib.import_module(f"{__package__}.{module}"), function)
    # cast(name, group); topk(ratio, group); powersgd(rank, group)
    arg = compression.name if compression.arg is None else compression.arg
    state, hook = factory(arg, group=group, algorithm=algorithm)
    if warmup > 0:
        # The plain steps count in the compressor's stats: one set of figures for the run.
        if warmup_compression == "none":
            plain, plain_hook = HookState(group, algorithm, stats=state.stats), allreduce_hook
        else:
            plain = CastState(group, algorithm, stats=state.stats,
                              dtype=half_dtype(warmup_compression))
            plain_hook = cast_hook
        return WarmupState(warmup, state, hook, plain, plain_hook), warmup_hook
    return state, hook
