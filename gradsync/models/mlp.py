"""A multi-layer perceptron: the simplest model to check data-parallel training on."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Linear layers with ReLU between them and no activation after the last.

    Args:
        in_features: input width.
        hidden: widths of the hidden layers, in order; empty gives one linear layer.
        out_features: output width (number of classes for classification).

    Raises:
        ValueError: if any width is < 1.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int) -> None:
        super().__init__()
        widths = [in_features, *hidden, out_features]
        if min(widths) < 1:
            raise ValueError(f"all layer widths must be >= 1, got {widths}")
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Map `(b, in_features)` to logits `(b, out_features)`."""
        return self.net(x)
