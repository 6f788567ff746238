"""The pipelined Parameter Server: shards cut into many partitions stay exactly SGD on the
global batch (sync), async keeps its per-shard semantics, checkpoints stay exact, servers may
sit at any ranks (explicit, or a role per rank), and parameters may mix dtypes.

One world of 5 processes runs every session, each on a sub-group of it, so the processes
start once. (The failure rules with partitions in flight are test_ps_cli.py's, whose runs cut
each shard into several partitions.)
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed import run_workers
from tests.helpers import BATCH, OPTIMIZERS, STEPS, global_batch, make_model
from tests.helpers import in_process, one_line_error
from tests.helpers import one_process_reference as reference

TINY_MB = 256 / (1 << 20)  # 256-byte partitions: about 9 per shard of make_model over 2


class Mixed(nn.Module):
    """float64 layers and a float32 scale: two dtypes in one model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = make_model()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.float32))

    def forward(self, x):
        return self.body(x) * self.scale.double()


def _train(group, servers, optimizer, consistency="sync", model_fn=make_model, start=0,
           restored=None, save=None, cut=None, **kwargs):
    """One PS session on ``group``; a worker returns its parameters and the summary, a server
    its statistics."""
    from gradsync.ps import PSArchitecture

    arch = PSArchitecture(servers, consistency, 1, group, partition_mb=TINY_MB, **kwargs)
    model = model_fn()
    if not arch.is_worker:
        return ("server", arch.serve(model, OPTIMIZERS[optimizer], save=save, restored=restored))
    ps_model, opt = arch.prepare(model, OPTIMIZERS[optimizer], start_step=start)
    n, w = arch.num_workers, arch.worker_rank
    for step in range(start, STEPS):
        x, y = global_batch(step, n * BATCH)
        opt.zero_grad()
        nn.functional.mse_loss(ps_model(x[w * BATCH:(w + 1) * BATCH]),
                               y[w * BATCH:(w + 1) * BATCH]).backward()
        opt.step()
        if cut is not None and step + 1 == cut:
            assert ps_model.checkpoint(cut)
    summary = arch.finish()
    return ("worker", [p.detach().numpy().copy() for p in model.parameters()], summary)


def _sessions(rank, world):
    from gradsync import comm

    out = {}
    everyone = comm.world()
    out["sgd"] = _train(everyone, 2, "sgd")
    out["sgd, contiguous layout"] = _train(everyone, 2, "sgd", layout="contiguous")
    out["adam, servers at 1 and 3"] = _train(everyone, 2, "adam", server_ranks="1,3")
    os.environ["GRADSYNC_ROLE"] = "server" if rank in (0, 2) else "worker"
    try:
        out["role per rank"] = _train(everyone, 2, "sgd")
    finally:
        del os.environ["GRADSYNC_ROLE"]
    four = comm.new_group([0, 1, 2, 3])
    if four is not None:
        out["mixed dtypes"] = _train(four, 2, "sgd", model_fn=Mixed)
    three = comm.new_group([0, 1, 2])
    if three is not None:
        out["async"] = _train(three, 1, "sgd", "async")
    # A checkpoint at step 4 with partitions, then a fresh server resumes from it.
    saved = {}
    if four is not None:
        straight = _train(four, 2, "adam", save=lambda s, state: saved.update({s: state}),
                          cut=4)
        resumed = _train(four, 2, "adam", start=4, restored=saved.get(4))
        if straight[0] == "worker":
            out["resume"] = all(np.array_equal(a, b) for a, b in zip(straight[1], resumed[1]))
        else:
            out["resume"] = (saved[4]["step"], saved[4]["version"], len(saved[4]["versions"]))
    return out


@pytest.fixture(scope="module")
def sessions():
    return run_workers(_sessions, 5, timeout=170)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sync_with_many_partitions_equals_sgd_on_the_global_batch(sessions):
    for name, optimizer, servers in [("sgd", "sgd", [0, 1]),
                                     ("sgd, contiguous layout", "sgd", [0, 1]),
                                     ("adam, servers at 1 and 3", "adam", [1, 3]),
                                     ("role per rank", "sgd", [0, 2])]:
        want = reference(3, optimizer)
        workers = [r for r in range(5) if r not in servers]
        for rank in range(5):
            result = sessions[rank][name]
            assert result[0] == ("worker" if rank in workers else "server"), (name, rank)
            if result[0] == "server":
                assert result[1].updates == STEPS and result[1].rejected == 0
                continue
            summary = result[2]
            assert summary["server_ranks"] == servers, summary
            assert min(summary["partitions_per_server"]) > 4, summary  # pipelined
            for got, ref in zip(result[1], want):
                np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13, err_msg=name)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_parameters_of_two_dtypes_train_exactly(sessions):
    want = reference(2, "sgd", Mixed)
    for rank in (2, 3):
        role, params, _ = sessions[rank]["mixed dtypes"]
        for got, ref in zip(params, want):
            assert got.dtype == ref.dtype
            tol = 1e-12 if got.dtype == np.float64 else 1e-6
            np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_async_applies_whole_shards_and_checkpoints_stay_exact(sessions):
    stats = sessions[0]["async"][1]
    assert stats.updates == 2 * STEPS, stats  # one update per push of the shard, not per part
    for rank in (1, 2):
        assert np.isfinite(np.concatenate([p.ravel() for p in sessions[rank]["async"][1]])).all()
    for server in (0, 1):
        step, version, parts = sessions[server]["resume"]
        assert (step, version) == (4, 4) and parts > 4
    assert sessions[2]["resume"] is True and sessions[3]["resume"] is True


def test_partition_headers_are_validated():
    from gradsync.ps.protocol import DTYPE_CODES, Header, Kind, Status, validate

    f64 = DTYPE_CODES[torch.float64]
    parts = [(10, torch.float64, None, None), (4, torch.float64, None, None)]
    ok = dict(kind=Kind.PUSH, step=4, shard=1, numel=4, version=3, sender=2, dtype=f64,
              partition=1)
    expect = dict(shard=1, numel=10, step=4, dtype=torch.float64, version=5, peer=2,
                  parts=parts)
    assert validate(Header(**ok), **expect) == (Status.OK, "")
    cases = [({"partition": 2}, {}, Status.BAD_PARTITION, "partition 2; shard 1 has 2"),
             ({"partition": -1}, {}, Status.BAD_PARTITION, "partition -1"),
             ({}, {"seen": {1}}, Status.BAD_PARTITION, "partition 1 of step 4 was pushed"),
             ({"numel": 10}, {}, Status.WRONG_SIZE, "partition 1 has 4"),
             ({"kind": Kind.CHECKPOINT, "numel": 0}, {"seen": {0}, "checkpoints": True},
              Status.STEP_OUT_OF_RANGE, "in the middle of step 4")]
    for change, more, status, text in cases:
        got = validate(Header(**{**ok, **change}), **{**expect, **more})
        assert got[0] == status and text in got[1], (change, got)


def test_placement_flags_are_checked():
    from gradsync.ps.placement import parse_server_ranks
    from gradsync.train.config import PSConfig

    assert parse_server_ranks("4,0,2") == [0, 2, 4]
    assert parse_server_ranks("colocated") == "colocated"
    for bad in ("0,0", "-1", "a,b"):
        with pytest.raises(ValueError, match="--server-ranks"):
            parse_server_ranks(bad)
    with pytest.raises(ValueError, match="pass --servers 3"):
        PSConfig(server_ranks="0,2,4")
    with pytest.raises(ValueError, match="ps-partition-mb"):
        PSConfig(partition_mb=0)
    assert PSConfig(servers=3, server_ranks="0,2,4", partition_mb=0.5).partition_mb == 0.5


def test_shards_follow_unequal_links(tmp_path, monkeypatch):
    """A topology file with one slow host: the server there holds a quarter of the others'
    bytes; equal links keep equal shards; the default partition follows the slowest link
    and the pushes that head into one link at once."""
    from gradsync import comm
    from gradsync.ps.placement import fan_in, link_topology, server_weights, slowest_rate
    from gradsync.ps.sharding import partition_bytes_for, shard_layout

    monkeypatch.delenv("GRADSYNC_LAB", raising=False)
    path = tmp_path / "topology.json"
    comm.Topology((comm.HostLink("h0", (0, 1), 125e6), comm.HostLink("h1", (2, 3), 125e6),
                   comm.HostLink("h2", (4, 5), 31.25e6))).save(path)
    links = link_topology(str(path), 6)
    weights = server_weights(links, [0, 2, 4])
    assert weights == [125e6, 125e6, 31.25e6]
    layout = shard_layout([torch.empty(9000)], 3, weights=weights)
    assert [layout.shard_numel(k) for k in range(3)] == [4000, 4000, 1000]
    assert partition_bytes_for(slowest_rate(links)) == 156_250  # 5 ms of 250 Mbit/s
    # Up to 15 ms of the link in the pushes heading into one host at once: one server per
    # host, 3 workers elsewhere, keeps 5 ms; host 0's 2 servers x 4 remote workers, 1.9 ms;
    # at 25 Mbit/s the 64 KiB floor holds for 3 (192 KiB at once).
    assert fan_in(links.host_of, [0, 2, 4], [1, 3, 5]) == 2
    assert fan_in(links.host_of, [0, 1], [2, 3, 4, 5]) == 8
    assert fan_in(lambda r: r, [0, 1, 2], [3, 4, 5]) == 3 and fan_in(None, [0], [1, 2]) == 2
    assert partition_bytes_for(25e6, 3) == 125_000 and partition_bytes_for(25e6, 4) == 93_750
    assert partition_bytes_for(25e6, 8) == 46_875
    assert partition_bytes_for(25e6, 1000) == 16 << 10
    assert partition_bytes_for(3.125e6, 3) == 64 << 10
    equal = comm.Topology.uniform(4, 2)
    assert server_weights(equal, [0, 2]) is None and link_topology("probe") is None


def test_bad_placement_flags_get_one_line(capfd):
    for args, needle in [(["--server-ranks", "0,0"], "distinct"),
                         (["--server-ranks", "1,3"], "pass --servers 2"),
                         (["--ps-partition-mb", "0"], "--ps-partition-mb")]:
        one_line_error(in_process(capfd, "train", "--arch", "ps", *args), needle)
