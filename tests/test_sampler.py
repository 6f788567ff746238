"""ShardedSampler: sharding rules, determinism, DistributedSampler parity, eval mode."""

from __future__ import annotations

import sys
import types
from collections import Counter

import pytest
import torch
from torch.utils.data import DistributedSampler

from gradsync.data import ShardedSampler


def shards(length: int, replicas: int, **kwargs: object) -> list[list[int]]:
    """Every rank's indices for one configuration."""
    samplers = [
        ShardedSampler(length, num_replicas=replicas, rank=r, **kwargs)  # type: ignore[arg-type]
        for r in range(replicas)
    ]
    return [list(s) for s in samplers]


@pytest.mark.parametrize("length", [0, 1, 3, 10, 17, 64])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("shuffle", [False, True])
def test_train_mode_pads_to_equal_shards_covering_all(
    length: int, replicas: int, shuffle: bool
) -> None:
    parts = shards(length, replicas, shuffle=shuffle, seed=3)
    per_rank = -(-length // replicas)  # ceil(n / R)
    assert all(len(p) == per_rank for p in parts)
    for r, p in enumerate(parts):
        assert len(ShardedSampler(length, num_replicas=replicas, rank=r)) == len(p)
    counts = Counter(i for p in parts for i in p)
    assert set(counts) == set(range(length))  # every sample appears
    # Padding repeats samples only as much as needed to even out the shards.
    assert sum(counts.values()) - length == per_rank * replicas - length
    if length >= replicas:
        assert max(counts.values(), default=1) <= 2


@pytest.mark.parametrize("length", [0, 1, 3, 10, 17, 64])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 8])
def test_train_mode_drop_last_gives_disjoint_equal_shards(length: int, replicas: int) -> None:
    parts = shards(length, replicas, shuffle=True, drop_last=True)
    per_rank = length // replicas
    assert all(len(p) == per_rank for p in parts)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == per_rank * replicas  # disjoint, nothing repeated
    assert set(flat) <= set(range(length))


def test_unshuffled_train_mode_is_strided() -> None:
    assert shards(10, 3, shuffle=False) == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]


def test_same_seed_and_epoch_reproduce_and_epochs_differ() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        sampler = ShardedSampler(100, num_replicas=2, rank=1, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    # The shuffle depends on seed + epoch only, like DistributedSampler.
    assert order(1, 0) == order(0, 1)


def test_iterating_twice_gives_the_same_epoch() -> None:
    sampler = ShardedSampler(50, num_replicas=3, rank=2, seed=7)
    sampler.set_epoch(4)
    assert list(sampler) == list(sampler)


@pytest.mark.parametrize("length", [1, 5, 10, 11, 33])
@pytest.mark.parametrize("replicas", [1, 2, 3, 7])
@pytest.mark.parametrize("drop_last", [False, True])
def test_matches_distributed_sampler(length: int, replicas: int, drop_last: bool) -> None:
    dataset = list(range(length))  # DistributedSampler needs __len__, not an int
    for seed in (0, 5):
        for epoch in (0, 1, 3):
            for shuffle in (False, True):
                for rank in range(replicas):
                    ours = ShardedSampler(
                        dataset, replicas, rank, shuffle=shuffle, seed=seed, drop_last=drop_last
                    )
                    theirs = DistributedSampler(
                        dataset, replicas, rank, shuffle=shuffle, seed=seed, drop_last=drop_last
                    )
                    ours.set_epoch(epoch)
                    theirs.set_epoch(epoch)
                    assert list(ours) == list(theirs)
                    assert len(ours) == len(theirs)


@pytest.mark.parametrize("length", [0, 1, 3, 10, 17])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 8])
def test_eval_mode_sees_every_sample_exactly_once(length: int, replicas: int) -> None:
    parts = shards(length, replicas, eval_mode=True, shuffle=True, seed=9)
    assert sorted(i for p in parts for i in p) == list(range(length))
    assert [len(p) for p in parts] == [len(range(r, length, replicas)) for r in range(replicas)]
    for r, p in enumerate(parts):
        assert p == list(range(r, length, replicas))  # shuffle is ignored in eval mode
        assert len(ShardedSampler(length, num_replicas=replicas, rank=r, eval_mode=True)) == len(p)


def test_set_position_skips_once_within_the_epoch() -> None:
    sampler = ShardedSampler(40, num_replicas=2, rank=0, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_position(6)
    assert len(sampler) == len(full) - 6
    assert list(sampler) == full[6:]
    # The skip is consumed by that iteration; the next one starts at the beginning.
    assert len(sampler) == len(full)
    assert list(sampler) == full


def test_state_dict_round_trip_resumes_mid_epoch() -> None:
    before = ShardedSampler(40, num_replicas=2, rank=1, seed=11)
    before.set_epoch(3)
    expected = list(before)[5:]
    state = before.state_dict()
    assert state == {"epoch": 3, "seed": 11, "position": 0}
    state["position"] = 5  # the trainer's count of consumed samples

    after = ShardedSampler(40, num_replicas=2, rank=1, seed=0)
    after.load_state_dict(state)
    assert (after.epoch, after.seed) == (3, 11)
    assert list(after) == expected
    after.load_state_dict({"epoch": 3, "seed": 11})  # position is optional
    assert after.position == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_replicas": 0, "rank": 0}, "num_replicas must be >= 1, got 0"),
        ({"num_replicas": -2, "rank": 0}, "got -2"),
        ({"num_replicas": 2, "rank": 2}, "rank must be in \\[0, 1\\], got 2"),
        ({"num_replicas": 2, "rank": -1}, "got -1"),
        ({"num_replicas": 2, "rank": 0, "eval_mode": True, "drop_last": True}, "drop_last"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShardedSampler(10, **kwargs)  # type: ignore[arg-type]


def test_bad_length_and_position_raise() -> None:
    with pytest.raises(ValueError, match="got -1"):
        ShardedSampler(-1, num_replicas=1, rank=0)
    sampler = ShardedSampler(10, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="got 6"):
        sampler.set_position(6)
    with pytest.raises(ValueError, match="got -1"):
        sampler.set_position(-1)


def test_missing_world_comes_from_gradsync_comm(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for gradsync.comm so the test needs no process group.
    fake = types.ModuleType("gradsync.comm")
    fake.get_world_size = lambda: 4  # type: ignore[attr-defined]
    fake.get_rank = lambda: 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gradsync.comm", fake)
    sampler = ShardedSampler(10, seed=0)
    assert (sampler.num_replicas, sampler.rank) == (4, 3)
    assert ShardedSampler(10, num_replicas=8).rank == 3  # only the missing value is read


def test_accepts_sized_datasets() -> None:
    data = torch.utils.data.TensorDataset(torch.zeros(7, 2))
    assert len(ShardedSampler(data, num_replicas=2, rank=1)) == 4
