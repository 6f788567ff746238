"""Topology: the JSON file and its checks, host detection, the probe, agreement between
ranks, and what ``auto`` chooses on a given network."""

from __future__ import annotations

import json

import pytest

from gradsync.comm.cost_model import CostModel, network_candidates
from gradsync.comm.p2p import weighted_bounds
from gradsync.comm.topology import HostLink, Topology, TopologyError
from tests.distributed import run_checks
from tests.helpers import first_ranks

GBIT = 1e9 / 8


def unequal4() -> Topology:
    return Topology(tuple(HostLink(f"h{i}", (i,), r * GBIT) for i, r in enumerate((1, 1, 1, .25))))


# --- the data ---------------------------------------------------------------------------

def test_json_round_trip_and_description(tmp_path):
    topo = Topology((HostLink("a", (0, 1), 125e6), HostLink("b", (2, 3), 31.25e6)))
    path = tmp_path / "t.json"
    topo.save(path)
    assert json.loads(path.read_text())["hosts"][1] == {"name": "b", "ranks": [2, 3],
                                                       "rate_mbit": 250.0}
    back = Topology.load(path)
    assert back == topo and back.fingerprint() == topo.fingerprint()
    assert back.ranks_per_host == 2 and back.unequal() and back.measured
    assert back.rank_rates() == [62.5e6, 62.5e6, 15.625e6, 15.625e6]
    assert "250.0 Mbit/s  ranks 2,3" in back.describe()


@pytest.mark.parametrize("text, message", [
    ('{"hosts": [{"ranks": [0]}, {"ranks": [2]}]}', "ranks [1] are on no host"),
    ('{"hosts": [{"ranks": [0, 1]}, {"ranks": [1, 2]}]}', "rank 1 is on two hosts"),
    ('{"hosts": [{"ranks": [0, 1, 2, 3]}]}', "lists rank 3, but the group has ranks 0..2"),
    ('{"hosts": [{"ranks": [0], "rate_mbit": 0}, {"ranks": [1, 2], "rate_mbit": 5}]}',
     "rate_mbit 0; it must be a positive number"),
    ('{"hosts": [{"ranks": [0], "rate_mbit": 10}, {"ranks": [1, 2]}]}', "have no rate while"),
    ('{"hosts": [{"name": "x", "ranks": [0]}, {"name": "x", "ranks": [1, 2]}]}', "appears twice"),
    ('{"hosts": [{"ranks": []}, {"ranks": [0, 1, 2]}]}', "has no ranks"),
])
def test_a_topology_that_does_not_fit_the_group_is_named(text, message):
    with pytest.raises(TopologyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Topology.from_json(text, source="t.json").validate(3)


@pytest.mark.parametrize("text, message", [
    ("{", "is not JSON"), ('{"hosts": 3}', 'a list "hosts"'),
    ('{"hosts": [{"ranks": ["0"]}]}', "a list of integers"),
    ('{"hosts": [{"ranks": [0], "rate_mbit": "fast"}]}', "not a number"),
])
def test_malformed_files_are_named(text, message):
    with pytest.raises(TopologyError, match=message):
        Topology.from_json(text, source="t.json")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(TopologyError, match="cannot read topology file .*nope.json"):
        Topology.load(tmp_path / "nope.json")


def test_weighted_bounds_cover_the_range_in_proportion():
    for numel in (0, 1, 3, 10, 1031):
        for weights in ([1, 1, 1, 0], [3, 1], [0, 5, 0], [0.1, 0.7, 0.2]):
            bounds = weighted_bounds(numel, weights)
            assert bounds[0][0] == 0 and bounds[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            for (s, e), w in zip(bounds, weights):
                assert abs((e - s) - numel * w / sum(weights)) < 1
                assert w > 0 or e == s
    with pytest.raises(ValueError):
        weighted_bounds(4, [0, 0])


# --- the cost model on a network ----------------------------------------------------------

def test_auto_keeps_todays_choice_on_equal_links():
    model = CostModel()
    equal = Topology.uniform(4, 1, GBIT)
    assert network_candidates(equal) == () and network_candidates(None) == ()
    for nbytes in (1 << 10, 1 << 20, 16 << 20):
        assert model.choose(nbytes, 4, topology=equal) == model.choose(nbytes, 4)
        assert model.choose(nbytes, 4) not in ("aware", "hierarchical")


def test_auto_picks_aware_for_large_tensors_on_unequal_links():
    model = CostModel()
    assert network_candidates(unequal4()) == ("aware",)
    assert model.choose(16 << 20, 4, topology=unequal4()) == "aware"
    assert model.choose(64 << 20, 4, topology=unequal4()) == "aware"
    # S / B_slow against the ring's 1.5 S / B_slow
    assert model.predict_on(unequal4(), "aware", 16 << 20) == pytest.approx(
        (16 << 20) / (0.25 * GBIT), rel=0.02)
    assert model.predict_on(unequal4(), "native", 16 << 20) >= 1.45 * (16 << 20) / (0.25 * GBIT)


def test_auto_picks_hierarchical_for_several_ranks_per_host():
    model = CostModel()
    two_by_two = Topology.uniform(4, 2, GBIT)
    assert network_candidates(two_by_two) == ("hierarchical",)
    assert model.choose(16 << 20, 4, topology=two_by_two) == "hierarchical"
    unmeasured = Topology.uniform(4, 2)
    assert network_candidates(unmeasured) == ()


# --- on live groups -----------------------------------------------------------------------

def _hosts_at_start_up(rank, n):
    """Before anything probes: the world and its sub-groups know their hosts, and a small
    all_reduce with the default algorithm runs on shared memory (as in any script)."""
    import dataclasses

    import torch

    from gradsync import comm

    world = comm.world()
    half = comm.new_group([0, 1])
    shm = comm.REGISTRY["shm"]
    seen = []

    def spy(*args):  # the shared-memory algorithm, noting that it ran
        seen.append(True)
        return shm.run(*args)

    comm.REGISTRY["shm"] = dataclasses.replace(shm, run=spy)
    try:
        t = torch.full((256,), float(rank))
        comm.all_reduce(t)
    finally:
        comm.REGISTRY["shm"] = shm
    return (world.topology.to_json(), half and half.topology.to_json(), bool(seen),
            t[0].item())


def _detect_and_probe(rank, n, hosts):
    import os

    from gradsync import comm

    single = comm.probe_topology()
    # The hosts found at start-up would send the probe's own small all-reduces through
    # shared memory, which refuses the fake hosts below; forget them first.
    comm.set_topology(None)
    os.environ["GRADSYNC_HOST"] = f"fake{rank % hosts}"  # ranks r, r+hosts, ... share a host
    try:
        multi = comm.probe_topology(budget_s=30.0)
    finally:
        del os.environ["GRADSYNC_HOST"]
    comm.set_topology(multi)
    return single.to_json(), multi.to_json(), comm.world().topology == multi


@pytest.mark.timeout(180)
def test_start_up_knows_the_hosts_and_auto_takes_shared_memory(world):
    for rank, (hosts, half, took_shm, total) in enumerate(world["hosts at start-up"]):
        assert json.loads(hosts) == {"hosts": [{"name": "h0", "ranks": [0, 1, 2, 3]}]}
        assert (half is None) == (rank >= 2)
        assert half is None or json.loads(half) == {"hosts": [{"name": "h0", "ranks": [0, 1]}]}
        assert took_shm and total == 0 + 1 + 2 + 3


@pytest.mark.timeout(180)
def test_probe_groups_hosts_and_measures_every_link(world):
    results = world["probe"]
    single, multi, attached = results[0]
    assert all(r == results[0] for r in results), "ranks saw different topologies"
    assert json.loads(single) == {"hosts": [{"name": "h0", "ranks": [0, 1, 2, 3]}]}
    hosts = json.loads(multi)["hosts"]
    assert [h["ranks"] for h in hosts] == [[0, 2], [1, 3]]
    assert all(h["rate_mbit"] > 0 for h in hosts) and attached


def _probe_out_of_budget(rank, n):
    """On world ranks 0-2."""
    import logging
    import os

    from gradsync import comm

    group = first_ranks(3)
    if group is None:
        return None
    comm.set_topology(None, group)  # as in _detect_and_probe
    os.environ["GRADSYNC_HOST"] = f"fake{rank}"
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("gradsync.comm.probe")
    logger.addHandler(handler)
    try:
        topo = comm.probe_topology(group, budget_s=1e-6)
    finally:
        logger.removeHandler(handler)
        del os.environ["GRADSYNC_HOST"]
    return topo.measured, [h.ranks for h in topo.hosts], [r.getMessage() for r in records]


@pytest.mark.timeout(180)
def test_a_probe_past_its_budget_falls_back_with_one_warning(world):
    results = world["probe past its budget"][:3]
    for measured, hosts, messages in results:
        assert not measured and hosts == [(0,), (1,), (2,)]
    assert len(results[0][2]) == 1 and "using the topology-free choice" in results[0][2][0]


def _disagree(rank, n):
    """On world ranks 0-2."""
    from gradsync import comm

    group = first_ranks(3)
    if group is None:
        return None
    topo = Topology.uniform(3, 1, GBIT * (2 if rank == 1 else 1))
    try:
        comm.set_topology(topo, group)
    except comm.CollectiveMismatchError as exc:
        return str(exc)
    return "no error"


@pytest.mark.timeout(180)
def test_ranks_with_different_topologies_get_a_table_not_a_hang(world):
    for message in world["ranks disagree"][:3]:
        assert "ranks disagree on the topology" in message
        assert "rank 0: 3 hosts" in message and "rank 1: 3 hosts" in message


def _wrong_size(rank, n):
    """On world ranks 0-2."""
    from gradsync import comm

    group = first_ranks(3)
    if group is None:
        return None
    try:
        comm.set_topology(Topology.uniform(2, 1, GBIT), group)
    except comm.TopologyError as exc:
        return str(exc)
    return "no error"


@pytest.mark.timeout(180)
def test_a_topology_for_another_world_is_refused(world):
    assert world["another world's topology"][:3] == [
        "ranks [2] are on no host (the group has 3 ranks)"] * 3


# --- DataParallel on a network -------------------------------------------------------------

def _train(rank, n, rates, algorithm):
    import hashlib

    import torch

    from gradsync import comm
    from gradsync.allreduce import DataParallel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Tanh(), torch.nn.Linear(512, 4))
    topo = Topology(tuple(HostLink(f"h{r}", (r,), rate * GBIT) for r, rate in enumerate(rates)))
    dp = DataParallel(model, algorithm=algorithm, topology=topo)
    opt = torch.optim.SGD(dp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(3):
        x, y = torch.randn(16, 512, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(dp(x), y).backward()
        opt.step()
    digest = hashlib.sha1()
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
    return dp.bucket_algorithms, digest.hexdigest(), comm.world().topology == topo


@pytest.mark.timeout(180)
def test_data_parallel_auto_uses_the_topology_and_the_result_does_not_depend_on_it(world):
    """auto picks aware for 1 MiB buckets on unequal links (the native ring on equal ones),
    and aware's sums run in rank order whatever the shards: the parameters after training on
    unequal links equal, bit for bit, those of aware on equal links."""
    unequal, equal, forced = world["auto, unequal"], world["auto, equal"], world["aware, equal"]
    assert all(r[2] for r in unequal + equal + forced)
    assert all("aware" in r[0] for r in unequal) and unequal[0][0][0] == "aware"
    assert all(set(r[0]) == {"native"} for r in equal)
    assert len({r[1] for r in unequal + forced}) == 1


# One world of 4 runs every check of this file (a world of 3 is its first 3 ranks); the
# refused topologies come last.
CHECKS = [("hosts at start-up", _hosts_at_start_up, ()),
          ("probe", _detect_and_probe, (2,)),
          ("probe past its budget", _probe_out_of_budget, ()),
          ("auto, unequal", _train, ((1, 1, 1, .25), "auto")),
          ("auto, equal", _train, ((1, 1, 1, 1), "auto")),
          ("aware, equal", _train, ((1, 1, 1, 1), "aware")),
          ("another world's topology", _wrong_size, ()),
          ("ranks disagree", _disagree, ())]


@pytest.fixture(scope="module")
def world():
    return run_checks(CHECKS, 4, timeout=170)
