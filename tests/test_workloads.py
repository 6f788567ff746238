"""Workload registry, datasets and models: shapes, determinism, sizes, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from gradsync.data import CharSequenceDataset, load_digits, split_corpus, stdlib_text_corpus
from gradsync.models import TinyGPT
from gradsync.workloads import WORKLOADS, Workload, build_workload, summarize_eval

# Batch shape of inputs / outputs per workload: (input shape, output shape) for b = 4.
EXPECTED_SHAPES = {
    "digits-mlp": ((4, 64), (4, 10)),
    "digits-wide": ((4, 64), (4, 10)),
    "digits-cnn": ((4, 1, 8, 8), (4, 10)),
    "stdlib-gpt": ((4, 64), (4, 64, 256)),
    "synthetic-mlp": ((4, 784), (4, 10)),
}


@pytest.fixture(scope="module")
def workloads() -> dict[str, Workload]:
    # hidden=64 keeps synthetic-mlp small; its default size is checked separately.
    return {name: build_workload(name, seed=0, hidden=64) for name in WORKLOADS}


def test_registry_names() -> None:
    assert set(WORKLOADS) == set(EXPECTED_SHAPES)


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_forward_shapes_loss_and_eval_sums(workloads: dict[str, Workload], name: str) -> None:
    w = workloads[name]
    x, y = next(iter(DataLoader(w.train_set, batch_size=4)))
    in_shape, out_shape = EXPECTED_SHAPES[name]
    assert tuple(x.shape) == in_shape
    out = w.model(x)
    assert tuple(out.shape) == out_shape
    loss = w.loss_fn(out, y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # An untrained model predicts close to uniformly: loss near log(classes).
    assert abs(loss.item() - math.log(out.shape[-1])) < 1.0

    sums = w.eval_sums(out, y)
    assert sums.dtype == torch.float64 and sums.shape == (3,)
    assert sums[2].item() == y.numel()
    assert sums[0].item() == pytest.approx(loss.item() * y.numel(), rel=1e-5)
    metrics = summarize_eval(w, sums)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    if w.metric == "perplexity":
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert len(w.eval_set) > 0


def test_eval_sums_add_up_across_shards(workloads: dict[str, Workload]) -> None:
    # Summing per-shard sums must equal one evaluation over the whole set.
    w = workloads["digits-mlp"]
    x, y = w.eval_set.tensors  # type: ignore[attr-defined]
    with torch.no_grad():
        whole = w.eval_sums(w.model(x), y)
        parts = sum(w.eval_sums(w.model(x[r::3]), y[r::3]) for r in range(3))
    assert torch.equal(whole[1:], parts[1:])  # integer counts: exact
    assert whole[0].item() == pytest.approx(parts[0].item(), rel=1e-12)


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn", "stdlib-gpt"])
def test_same_seed_same_parameters(name: str) -> None:
    a = build_workload(name, seed=1).model.state_dict()
    b = build_workload(name, seed=1).model.state_dict()
    c = build_workload(name, seed=2).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_building_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_workload("digits-mlp", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_synthetic_mlp_parameter_count() -> None:
    w = build_workload("synthetic-mlp")
    # 784*1024 + 1024 + 1024*1024 + 1024 + 1024*10 + 10
    assert sum(p.numel() for p in w.model.parameters()) == 1_863_690


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_float64_workloads(name: str) -> None:
    w = build_workload(name, hidden=16, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in w.model.parameters())
    x, y = w.train_set[0]
    assert y.dtype == torch.int64
    assert x.dtype == (torch.int64 if name == "stdlib-gpt" else torch.float64)
    assert w.model(x.unsqueeze(0)).dtype == torch.float64


def test_unknown_workload_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown workload 'nope'.*digits-cnn.*synthetic-mlp"):
        build_workload("nope")


def test_digits_split_and_scaling() -> None:
    train, test = load_digits(seed=0)
    assert len(train) + len(test) == 1797
    assert len(test) == 360  # ceil(0.2 * 1797)
    x, y = train.tensors
    assert x.dtype == torch.float32 and x.shape[1] == 64 and y.dtype == torch.int64
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0
    assert set(test.tensors[1].tolist()) == set(range(10))  # stratified: all classes
    again, _ = load_digits(seed=0)
    assert torch.equal(again.tensors[0], x)
    images, _ = load_digits(seed=0, images=True)
    assert torch.equal(images.tensors[0].reshape(-1, 64), x)


def test_stdlib_corpus_is_nonempty_and_deterministic() -> None:
    corpus = stdlib_text_corpus(max_bytes=50_000)
    assert len(corpus) == 50_000
    assert corpus == stdlib_text_corpus(max_bytes=50_000)
    assert b"def " in corpus and b"import " in corpus
    assert stdlib_text_corpus(max_bytes=1_000) == corpus[:1_000]


def test_char_sequence_windows() -> None:
    data = bytes(range(20))
    ds = CharSequenceDataset(data, context=6)
    assert len(ds) == 3  # (20 - 1) // 6
    x, y = ds[1]
    assert x.tolist() == list(range(6, 12)) and y.tolist() == list(range(7, 13))
    assert x.dtype == torch.int64
    assert ds[-1][1].tolist() == list(range(13, 19))
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError, match="context"):
        CharSequenceDataset(data, context=0)
    train, val = split_corpus(b"abcdefghij", val_fraction=0.3)
    assert (train, val) == (b"abcdefg", b"hij")


def test_tiny_gpt_is_causal_and_checks_length() -> None:
    torch.manual_seed(0)
    model = TinyGPT(context=8, d_model=16, n_heads=2, n_layers=1).eval()
    x = torch.randint(0, 256, (2, 8))
    changed = x.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 256
    with torch.no_grad():
        # Later tokens must not influence earlier logits.
        assert torch.allclose(model(x)[:, :5], model(changed)[:, :5])
    with pytest.raises(ValueError, match="exceeds context"):
        model(torch.zeros(1, 9, dtype=torch.int64))
    tied = TinyGPT(context=8, d_model=16, n_heads=2, n_layers=1, tie_weights=True)
    assert tied.head.weight is tied.tok_emb.weight


@pytest.mark.timeout(60)
def test_digits_cache_gives_the_same_split_and_survives_a_damaged_file(tmp_path, monkeypatch):
    from gradsync.data import load_digits

    monkeypatch.setenv("GRADSYNC_CACHE", str(tmp_path))
    first = load_digits(seed=3)                       # scikit-learn, then the cache written
    (cached,) = tmp_path.glob("digits-seed3-*.npz")
    again = load_digits(seed=3)                       # from the cache
    cached.write_bytes(b"not an npz")
    repaired = load_digits(seed=3)                    # a damaged cache is read around
    for other in (again, repaired):
        for a, b in zip(first, other):
            assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    assert len(first[0]) + len(first[1]) == 1797
