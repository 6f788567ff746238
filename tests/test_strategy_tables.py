"""One table per strategy family: everything that lists architectures, compressors and
consistency modes derives from it, and a spec is parsed once into an object that travels.
The one training loop: the elastic path honours the flags the plain one does."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from tests.distributed import scaled
from tests.helpers import ENV, REPO


def test_every_architecture_in_the_table_builds_from_config_and_summarises():
    from gradsync.train.architecture import ARCHITECTURES, REGISTRY, check_architecture
    from gradsync.train.config import TrainConfig

    assert ARCHITECTURES == tuple(REGISTRY) and {"allreduce", "ps"} <= set(ARCHITECTURES)
    for name, entry in REGISTRY.items():
        cls = entry.load()
        for method in ("from_config", "prepare", "finish", "summary_head", "summary_lines"):
            assert callable(getattr(cls, method, None)), (name, method)
        workers = 1 if name == "local" else 2
        TrainConfig(arch=name, launch=dataclasses.replace(TrainConfig().launch,
                                                          workers=workers))
    with pytest.raises(ValueError, match="choose one of allreduce, ps, ddp, local"):
        check_architecture("horovod")
    with pytest.raises(ValueError, match="unknown --arch 'x'"):
        TrainConfig(arch="x")


def test_compression_specs_parse_once_and_round_trip():
    from gradsync.compress.spec import COMPRESSORS, REGISTRY, Compression, parse
    from gradsync.ps.compression import check_compression
    from gradsync.train.config import CompressionConfig

    assert [c.split(":")[0] for c in COMPRESSORS] == list(REGISTRY)
    for entry in REGISTRY.values():
        spec = entry.example or entry.name
        parsed = parse(spec)
        assert str(parsed) == spec and parse(parsed) is parsed  # an object is not re-parsed
        assert parsed.compressor is entry
        if entry.ps:
            assert check_compression(parsed) is parsed
        else:
            with pytest.raises(ValueError, match="parameter server does not support"):
                check_compression(parsed)
    assert CompressionConfig("topk:0.05").spec == Compression("topk", 0.05)
    with pytest.raises(ValueError, match="choose one of " + ", ".join(COMPRESSORS)):
        parse("zip")


def test_consistency_modes_and_the_launchers_tolerance_follow_the_table():
    import typing

    from gradsync.ps.consistency import MODES
    from gradsync.ps.placement import local_server_ranks, tolerated_ranks
    from gradsync.ps.server import ServerConfig
    from gradsync.train.config import PSConfig

    hint = typing.get_type_hints(PSConfig)["consistency"]
    assert typing.get_args(hint) == tuple(MODES)
    with pytest.raises(ValueError, match="one of sync, async, ssp"):
        ServerConfig(consistency="eventual")
    servers = local_server_ranks(1, None, 4)
    assert servers == {0}
    assert tolerated_ranks(servers, 4, "sync", elastic=False) == frozenset()
    assert tolerated_ranks(servers, 4, "async", elastic=False) == {1, 2, 3}
    # Elastic: the first worker evaluates and writes the summary, so its loss stops the run.
    assert tolerated_ranks(servers, 4, "sync", elastic=True) == {2, 3}
    assert local_server_ranks(2, "colocated", 4) == {0}
    with pytest.raises(ValueError, match="this run has 4 processes"):
        local_server_ranks(2, "0,7", 4)


def test_a_topology_follows_the_members_of_each_elastic_generation():
    from gradsync.allreduce.architecture import _members_topology
    from gradsync.comm import HostLink, Topology

    first = Topology((HostLink("a", (0, 1), 1e9), HostLink("b", (2, 3), 1e8)))
    # Members 1 and 3 of the first generation are now group ranks 0 and 1.
    assert _members_topology(first, [1, 3]) == Topology(
        (HostLink("a", (0,), 1e9), HostLink("b", (1,), 1e8)))
    assert _members_topology(first, [0, 1, 2, 3]) == first
    assert _members_topology(first, [0, 4]) is None  # a replacement on no known host
    assert _members_topology("probe", [0, 4]) == "probe"


@pytest.mark.timeout(120)
def test_elastic_runs_check_the_topology_file(tmp_path):
    """--topology under --elastic is read, not dropped: a file for another world is refused."""
    path = tmp_path / "topology.json"
    path.write_text('{"hosts": [{"name": "a", "ranks": [0, 1, 2]}]}')
    run = subprocess.run([sys.executable, "-m", "gradsync", "train", "--elastic", "--workers",
                          "2", "--steps", "2", "--no-progress", "--topology", str(path)],
                         capture_output=True, text=True, timeout=scaled(100), env=ENV, cwd=REPO)
    assert run.returncode == 2, run.stderr
    assert "--topology: host 'a' lists rank 2" in run.stderr, run.stderr


def test_elastic_all_reduce_refuses_a_port_it_would_not_use():
    from gradsync.train.config import LaunchConfig, TrainConfig

    with pytest.raises(ValueError, match="--port is not used by --elastic"):
        TrainConfig(launch=LaunchConfig(elastic=True, port=29500))
    TrainConfig(arch="ps", launch=LaunchConfig(elastic=True, port=29500))  # the PS's store


@pytest.mark.parametrize("kwargs, message", [
    ({"launch": {"rdzv_endpoint": "h:1"}}, "--rdzv-endpoint needs --elastic"),
    ({"launch": {"elastic": True, "rdzv_endpoint": "h"}}, "must be HOST:PORT"),
    ({"arch": "ps", "launch": {"elastic": True, "rdzv_endpoint": "h:1"}},
     "built for --arch allreduce without --checkpoint-dir"),
    ({"launch": {"elastic": True, "rdzv_endpoint": "h:1"}, "checkpoint": {"dir": "ck"}},
     "built for --arch allreduce without --checkpoint-dir"),
    ({"arch": "ps", "launch": {"elastic": True}, "checkpoint": {"dir": "ck"}},
     "--arch ps --elastic takes --max-restarts with --checkpoint-dir"),
    ({"arch": "ps", "launch": {"elastic": True, "max_restarts": 1}},
     "--arch ps --elastic takes --max-restarts with --checkpoint-dir"),
])
def test_elastic_refuses_what_it_does_not_do(kwargs: dict, message: str):
    from gradsync.train.config import CheckpointConfig, LaunchConfig, TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(arch=kwargs.get("arch", "allreduce"),
                    launch=LaunchConfig(**kwargs["launch"]),
                    checkpoint=CheckpointConfig(**kwargs.get("checkpoint", {})))
