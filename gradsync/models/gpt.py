"""A tiny decoder-only transformer for byte-level language modelling.

Follows the GPT-2 layout (Radford et al., 2019): learned positional embeddings,
pre-LayerNorm residual blocks, causal self-attention and a GELU feed-forward layer.
Shapes use b = batch, s = sequence, d = d_model, h = heads, k = d / h.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position i attends to positions <= i.

    Args:
        d_model: model width, divisible by `n_heads`.
        n_heads: number of heads.
        dropout: dropout on attention weights and on the output, during training only.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)  # queries, keys, values in one matmul
        self.proj = nn.Linear(d_model, d_model)
        self.out_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Map `(b, s, d)` to `(b, s, d)`."""
        b, s, d = x.shape
        # (b, s, 3d) -> (b, s, 3, h, k) -> (3, b, h, s, k)
        qkv = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (b, h, s, k)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (b, h, s, k)
        y = y.transpose(1, 2).reshape(b, s, d)  # heads side by side again: (b, s, d)
        return self.out_dropout(self.proj(y))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    Args:
        d_model: model width.
        n_heads: attention heads.
        dropout: dropout rate.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),  # (b, s, 4d)
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),  # (b, s, d)
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map `(b, s, d)` to `(b, s, d)`."""
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class TinyGPT(nn.Module):
    """Character-level (byte-level) GPT: token ids `(b, s)` to next-token logits.

    Args:
        vocab_size: number of token ids (256 for bytes).
        context: longest sequence the positional embedding covers.
        d_model: model width, divisible by `n_heads`.
        n_heads: attention heads per block.
        n_layers: number of blocks.
        dropout: dropout rate; 0 keeps training deterministic for a given seed.
        tie_weights: share the token embedding with the output layer (Press & Wolf,
            2017). Off by default so every parameter has its own tensor.

    Raises:
        ValueError: if `d_model` is not divisible by `n_heads` or a size is < 1.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        context: int = 64,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        dropout: float = 0.0,
        tie_weights: bool = False,
    ) -> None:
        super().__init__()
        if min(vocab_size, context, d_model, n_heads, n_layers) < 1:
            raise ValueError(
                "sizes must be >= 1, got "
                f"{vocab_size=}, {context=}, {d_model=}, {n_heads=}, {n_layers=}"
            )
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(n_layers)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self, n_layers: int) -> None:
        """GPT-2 initialisation: N(0, 0.02), zero biases, smaller residual outputs."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Each block adds two outputs to the residual stream; scaling them by
        # 1/sqrt(2 * n_layers) keeps its variance from growing with depth.
        residual_std = 0.02 / math.sqrt(2 * n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp[2].weight, mean=0.0, std=residual_std)

    def forward(self, x: Tensor) -> Tensor:
        """Map token ids `(b, s)` int64, `s <= context`, to logits `(b, s, vocab)`.

        Raises:
            ValueError: if `s > context`.
        """
        s = x.shape[1]
        if s > self.context:
            raise ValueError(f"sequence length {s} exceeds context {self.context}")
        positions = torch.arange(s, device=x.device)  # (s,)
        h = self.emb_dropout(self.tok_emb(x) + self.pos_emb(positions))  # (b, s, d)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))  # (b, s, vocab)
