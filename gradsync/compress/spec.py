"""``--compression`` specs: parse ``none|fp16|bf16|topk:RATIO|powersgd:RANK`` and build the
hook, with ``--compression-warmup`` steps of plain all-reduce first."""

from __future__ import annotations

from dataclasses import dataclass

from .. import comm
from .bucket import GradBucket
from .default import HookState, allreduce_hook

COMPRESSORS = ("none", "fp16", "bf16", "topk:RATIO", "powersgd:RANK")


@dataclass(frozen=True)
class Compression:
    """A parsed spec: ``name`` and its number (the top-k ratio, the PowerSGD rank)."""

    name: str
    arg: float | None = None

    def __str__(self) -> str:
        if self.arg is None:
            return self.name
        return f"{self.name}:{self.arg:g}" if self.name == "topk" else f"{self.name}:{int(self.arg)}"


def parse(spec: str) -> Compression:
    """The spec as a :class:`Compression`; ValueError naming what is wrong otherwise."""
    name, _, arg = spec.strip().partition(":")
    if name in ("none", "fp16", "bf16"):
        if arg:
            raise ValueError(f"--compression {spec!r}: {name} takes no argument")
        return Compression(name)
    if name == "topk":
        try:
            ratio = float(arg)
        except ValueError:
            raise ValueError(f"--compression {spec!r}: topk needs a ratio, e.g. topk:0.01")
        if not 0 < ratio < 1:
            raise ValueError(f"--compression {spec!r}: the top-k ratio must be between 0 and 1 "
                             f"(exclusive), e.g. topk:0.01")
        return Compression("topk", ratio)
    if name == "powersgd":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"--compression {spec!r}: powersgd needs a rank >= 1, e.g. "
                             f"powersgd:2")
        return Compression("powersgd", int(arg))
    raise ValueError(f"--compression {spec!r}: unknown compressor; choose one of "
                     f"{', '.join(COMPRESSORS)}")


@dataclass
class WarmupState:
    """Plain all-reduce (with ``plain``'s state) for the first ``steps`` steps, then
    ``inner``."""

    steps: int
    inner_state: object
    inner: object
    plain: HookState
    step: int = 0

    @property
    def stats(self):
        return self.inner_state.stats


def warmup_hook(state: WarmupState, bucket: GradBucket):
    warm = state.step < state.steps
    if bucket.is_last():
        state.step += 1
    if warm:
        return allreduce_hook(state.plain, bucket)
    return state.inner(state.inner_state, bucket)


def make_hook(compression: Compression | str, group: comm.Group | None = None,
              warmup: int = 0) -> tuple[object, object] | None:
    """(state, hook) for ``DataParallel.register_comm_hook``, or None for ``none``."""
    if isinstance(compression, str):
        compression = parse(compression)
    if compression.name == "none":
        return None
    if compression.name in ("fp16", "bf16"):
        from .cast import cast

        state, hook = cast(compression.name, group=group)
    elif compression.name == "topk":
        from .topk import topk

        state, hook = topk(compression.arg, group=group)
    else:
        from .powersgd import powersgd

        state, hook = powersgd(int(compression.arg), group=group)
    if warmup > 0:
        # The plain steps count in the compressor's stats: one set of figures for the run.
        plain = HookState(group, stats=state.stats)
        return WarmupState(warmup, state, hook, plain), warmup_hook
    return state, hook
