"""Named training workloads: a model, its data, its loss and the defaults that train it.

A workload is everything the trainer needs that does not depend on how gradients are
synchronised. Every rank calls `build_workload` with the same name and seed and gets the
same initial model, so no parameter broadcast is needed for correctness (the trainer may
still broadcast as a safeguard).

Evaluation is split into `Workload.eval_sums`, which returns sums for one batch, and
`summarize_eval`, which turns sums into metrics. Ranks add their sums (one all-reduce of a
3-element float64 tensor) before summarising, so the metric equals a single-process
evaluation when the eval sampler shards without padding (`ShardedSampler(eval_mode=True)`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

from gradsync.data import load_digits, stdlib_char_datasets, synthetic_classification
from gradsync.models import MLP, DigitsCNN, TinyGPT

# Context length and corpus size of "stdlib-gpt". 1 MB of source gives 14,062 training
# windows of 64 bytes; at 32 windows per worker and 2 workers that is 220 steps per
# epoch. Two single-threaded processes sharing two CPU cores took about 55 ms per step,
# so the default 3 epochs (660 steps) take about 40 s.
GPT_CONTEXT = 64
GPT_CORPUS_BYTES = 1_000_000


def cross_entropy_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over every prediction in the batch.

    Args:
        output: logits `(b, C)` for classification or `(b, s, V)` for language models.
        target: class ids `(b,)` or `(b, s)`, int64.

    Returns:
        Scalar mean loss (over samples, or over tokens for language models).
    """
    # Flattening all but the class dimension makes one function serve both shapes.
    return F.cross_entropy(output.flatten(0, -2), target.flatten())


@dataclass
class Workload:
    """A model with its data and training defaults.

    Attributes:
        name: registry name.
        model: freshly initialised model on the CPU; identical for identical seeds.
        train_set: training dataset of `(input, target)` pairs.
        eval_set: held-out dataset of `(input, target)` pairs.
        loss_fn: `loss_fn(output, target)` -> mean loss over the batch.
        metric: headline metric, "accuracy" or "perplexity".
        default_lr: learning rate tuned for 2 workers at `default_batch_size` each.
        default_epochs: epochs that reach the reported quality with the defaults.
        default_batch_size: batch size per worker.
        optimizer: "sgd" (momentum 0.9) or "adam".
    """

    name: str
    model: nn.Module
    train_set: Dataset
    eval_set: Dataset
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    metric: str
    default_lr: float
    default_epochs: int
    default_batch_size: int
    optimizer: str

    def __post_init__(self) -> None:
        if self.metric not in ("accuracy", "perplexity"):
            raise ValueError(f"metric must be 'accuracy' or 'perplexity', got {self.metric!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")

    def eval_sums(self, output: Tensor, target: Tensor) -> Tensor:
        """Sums over one evaluation batch that ranks can add up.

        Args:
            output: logits `(b, C)` or `(b, s, V)`.
            target: class ids `(b,)` or `(b, s)`.

        Returns:
            float64 tensor `[loss_sum, correct, count]` on `output`'s device, where
            `count` is samples (classification) or tokens (language models). `correct`
            and `count` are integers, so their sums across ranks are exact.
        """
        logits = output.detach().flatten(0, -2)  # (n, C), n = samples or tokens
        labels = target.flatten()  # (n,)
        # float64 so that summing many per-batch losses loses nothing noticeable.
        loss_sum = F.cross_entropy(logits.double(), labels, reduction="sum")
        correct = (logits.argmax(dim=-1) == labels).sum().double()
        count = torch.tensor(float(labels.numel()), dtype=torch.float64, device=output.device)
        return torch.stack([loss_sum, correct, count])


def summarize_eval(workload: Workload, sums: Tensor) -> dict[str, float]:
    """Turn summed `[loss_sum, correct, count]` into metrics.

    Args:
        workload: the workload that produced the sums.
        sums: `Workload.eval_sums` results added over batches (and ranks).

    Returns:
        `{"loss", "accuracy"}` for classification, `{"loss", "perplexity",
        "accuracy"}` for language models; accuracy is a fraction in [0, 1].

    Raises:
        ValueError: if `sums` does not have 3 elements or counts nothing.
    """
    if sums.numel() != 3:
        raise ValueError(f"expected [loss_sum, correct, count], got shape {tuple(sums.shape)}")
    loss_sum, correct, count = (float(v) for v in sums.double().cpu())
    if count <= 0:
        raise ValueError(f"count must be > 0, got {count}")
    result = {"loss": loss_sum / count, "accuracy": correct / count}
    if workload.metric == "perplexity":
        result["perplexity"] = math.exp(result["loss"])
    return result


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """Build a model under `torch.manual_seed(seed)` without changing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _cast(dataset: TensorDataset, dtype: torch.dtype) -> TensorDataset:
    """Convert the floating-point tensors of a TensorDataset to `dtype`; keep labels."""
    return TensorDataset(*(t.to(dtype) if t.is_floating_point() else t for t in dataset.tensors))


# The data split is fixed (seed 0) rather than following the model seed, so runs with
# different seeds are scored on the same test samples.
_SPLIT_SEED = 0


def _digits_classifier(name: str, seed: int, width: int, dtype: torch.dtype, lr: float,
                       epochs: int) -> Workload:
    """An MLP 64-width-width-10 on the digits, trained with SGD at batch 32."""
    train_set, eval_set = load_digits(seed=_SPLIT_SEED)
    model = _seeded(seed, lambda: MLP(64, [width, width], 10))
    return Workload(
        name=name,
        model=model.to(dtype),
        train_set=_cast(train_set, dtype),
        eval_set=_cast(eval_set, dtype),
        loss_fn=cross_entropy_loss,
        metric="accuracy",
        default_lr=lr,
        default_epochs=epochs,
        default_batch_size=32,
        optimizer="sgd",
    )


def _digits_mlp(*, seed: int, hidden: int, dtype: torch.dtype) -> Workload:
    return _digits_classifier("digits-mlp", seed, 128, dtype, lr=0.1, epochs=20)


def _digits_wide(*, seed: int, hidden: int, dtype: torch.dtype) -> Workload:
    # digits-mlp with hidden layers of --hidden (default 1024: 1.1 M parameters, 4.5 MB of
    # float32 gradients per step): a model that learns, with gradients big enough for the
    # network to set the pace (compression's time-to-accuracy benchmarks).
    return _digits_classifier("digits-wide", seed, hidden, dtype, lr=0.05, epochs=10)


def _digits_cnn(*, seed: int, hidden: int, dtype: torch.dtype) -> Workload:
    train_set, eval_set = load_digits(seed=_SPLIT_SEED, images=True)
    model = _seeded(seed, DigitsCNN)
    return Workload(
        name="digits-cnn",
        model=model.to(dtype),
        train_set=_cast(train_set, dtype),
        eval_set=_cast(eval_set, dtype),
        loss_fn=cross_entropy_loss,
        metric="accuracy",
        default_lr=0.05,
        default_epochs=15,
        default_batch_size=32,
        optimizer="sgd",
    )


def _stdlib_gpt(*, seed: int, hidden: int, dtype: torch.dtype) -> Workload:
    train_set, eval_set = stdlib_char_datasets(context=GPT_CONTEXT, max_bytes=GPT_CORPUS_BYTES)
    model = _seeded(seed, lambda: TinyGPT(context=GPT_CONTEXT))
    return Workload(
        name="stdlib-gpt",
        model=model.to(dtype),  # token ids stay int64; only the model changes dtype
        train_set=train_set,
        eval_set=eval_set,
        loss_fn=cross_entropy_loss,
        metric="perplexity",
        default_lr=3e-3,
        default_epochs=3,
        default_batch_size=32,
        optimizer="adam",
    )


def _synthetic_mlp(*, seed: int, hidden: int, dtype: torch.dtype) -> Workload:
    # 784 inputs like flattened MNIST; labels are random, so only speed is meaningful.
    train_set = synthetic_classification(8192, 784, 10, seed=seed)
    eval_set = synthetic_classification(1024, 784, 10, seed=seed + 1)
    model = _seeded(seed, lambda: MLP(784, [hidden, hidden], 10))
    return Workload(
        name="synthetic-mlp",
        model=model.to(dtype),
        train_set=_cast(train_set, dtype),
        eval_set=_cast(eval_set, dtype),
        loss_fn=cross_entropy_loss,
        metric="accuracy",
        default_lr=0.01,
        default_epochs=1,
        default_batch_size=64,
        optimizer="sgd",
    )


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "digits-mlp": _digits_mlp,
    "digits-wide": _digits_wide,
    "digits-cnn": _digits_cnn,
    "stdlib-gpt": _stdlib_gpt,
    "synthetic-mlp": _synthetic_mlp,
}


def build_workload(
    name: str, *, seed: int = 0, hidden: int = 1024, dtype: torch.dtype = torch.float32
) -> Workload:
    """Build a registered workload.

    Args:
        name: one of `WORKLOADS`.
        seed: model initialisation seed; equal seeds give bitwise-equal models.
        hidden: hidden width of "synthetic-mlp" and "digits-wide" (ignored by the others).
        dtype: floating dtype of the model and of floating-point inputs.

    Returns:
        The workload, with its model on the CPU.

    Raises:
        ValueError: if `name` is not registered.
    """
    try:
        make = WORKLOADS[name]
    except KeyError:
        known = ", ".join(sorted(WORKLOADS))
        raise ValueError(f"unknown workload {name!r}; known workloads: {known}") from None
    return make(seed=seed, hidden=hidden, dtype=dtype)
