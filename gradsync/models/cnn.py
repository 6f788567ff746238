"""A small convolutional net for scikit-learn's 8x8 digits."""

from __future__ import annotations

from torch import Tensor, nn


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, one 2x2 max-pool, two linear layers.

    No BatchNorm: its running statistics are per-rank buffers, which would make the
    replicas drift apart unless they are synchronised, a concern this model avoids.

    Args:
        num_classes: output width.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),  # (b, 16, 8, 8)
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),  # (b, 32, 8, 8)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (b, 32, 4, 4)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (b, 512)
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map images `(b, 1, 8, 8)` to logits `(b, num_classes)`."""
        return self.classifier(self.features(x))
