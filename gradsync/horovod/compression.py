"""Horovod's compressor contract, ``compress(t) -> (payload, ctx)`` and
``decompress(payload, ctx) -> t``, over gradsync's compressors (gradsync/compress/spec.py).

``Compression.none``, ``Compression.fp16`` and gradsync's ``Compression.bf16`` work with
every call: ``hvd.allreduce`` casts around its all-reduce, and ``DistributedOptimizer``
runs gradsync's cast hook on each gradient bucket. ``Compression.topk(ratio)`` and
``Compression.powersgd(rank)`` need error feedback and state per bucket (their own
collectives, not one cast around an all-reduce), so they do not fit ``compress`` /
``decompress``: only ``DistributedOptimizer`` takes them (gradsync's hooks); a tensor call
refuses them.
"""

from __future__ import annotations

import torch

from ..compress.spec import Compression as Spec
from ..compress.spec import parse


class Compressor:
    """The contract; ``spec`` is the gradsync compressor DistributedOptimizer runs."""

    spec: Spec = Spec("none")

    @staticmethod
    def compress(tensor: torch.Tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx):
        return tensor


class NoneCompressor(Compressor):
    """Send the tensor as it is."""


class _CastCompressor(Compressor):
    """Floating-point tensors travel in ``dtype``; others unchanged."""

    dtype = torch.float16

    @classmethod
    def compress(cls, tensor: torch.Tensor):
        if tensor.is_floating_point() and tensor.dtype != cls.dtype:
            return tensor.to(cls.dtype), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx):
        return tensor if ctx is None else tensor.to(ctx)


class FP16Compressor(_CastCompressor):
    dtype = torch.float16
    spec = Spec("fp16")


class BF16Compressor(_CastCompressor):
    dtype = torch.bfloat16
    spec = Spec("bf16")


class HookOnlyCompressor(Compressor):
    """A gradsync compressor with state per bucket (top-k, PowerSGD): DistributedOptimizer
    only."""

    def __init__(self, spec: str):
        self.spec = parse(spec)

    def compress(self, tensor):
        raise ValueError(f"Compression {self.spec} works only in hvd.DistributedOptimizer "
                         "(error feedback per bucket); use Compression.fp16 or bf16 here")

    decompress = compress

    def __repr__(self) -> str:
        return f"Compression.{self.spec.name}({self.spec.arg:g})"


class Compression:
    """What ``compression=`` takes."""

    none = NoneCompressor
    fp16 = FP16Compressor
    bf16 = BF16Compressor

    @staticmethod
    def topk(ratio: float) -> HookOnlyCompressor:
        """gradsync's top-k with error feedback, keeping ``ratio`` of each bucket."""
        return HookOnlyCompressor(f"topk:{ratio}")

    @staticmethod
    def powersgd(rank: int) -> HookOnlyCompressor:
        """gradsync's PowerSGD of ``rank``."""
        return HookOnlyCompressor(f"powersgd:{rank}")
