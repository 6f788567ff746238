"""Plain single-device models; none of them communicates (parallelism is applied outside)."""

from gradsync.models.cnn import DigitsCNN
from gradsync.models.gpt import TinyGPT
from gradsync.models.mlp import MLP

__all__ = ["MLP", "DigitsCNN", "TinyGPT"]
