"""`gradsync train --elastic`: the launcher hosts the store and the coordinator, each worker
trains a workload through :class:`~gradsync.train.elastic.ElasticLoop`.

    gradsync train --elastic --workers 4 --min-workers 2 --max-restarts 1

The launcher side (:func:`launch`, which starts a script's elastic workers too, for
`gradsync run --elastic`: the script joins through :mod:`gradsync.elastic`; :func:`run_local`
for `gradsync train`) holds the rendezvous store (a file only this user can
open) and the coordinator in its own process, so a lost worker (rank 0 too) takes nothing
with it, and supervises the workers with
:func:`gradsync.launcher.elastic.run_elastic`. The worker side (:func:`run_worker`) is the
trainer's loop on an elastic membership; the summary adds the membership changes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

from torch.utils.data import default_collate

from .. import comm
from ..comm.coordinator import Coordinator
from ..comm.elastic import STORE_ENV, ElasticWorld
from ..exits import EXIT_USAGE
from .config import TrainConfig
from .elastic import ElasticLoop
from .elastic_checkpoint import ElasticCheckpoints, claim
from .loop import RunLog, RunSetup, Tally, summarize, write_summary
from .summary import format_summary

log = logging.getLogger(__name__)


def launch(cmd: list[str], workers: int, *, min_workers: int = 1, max_restarts: int = 0,
           addr: str = "127.0.0.1", timeout_s: float = 300.0,
           env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` as ``workers`` elastic workers on this machine, holding their store and
    coordinator here; the exit status of the run. A script's workers join through
    ``gradsync.elastic.init()`` (GRADSYNC_ELASTIC_STORE, GRADSYNC_ELASTIC_UID; every worker,
    a replacement too, has torchrun's variables with WORLD_SIZE ``workers``)::

        sys.exit(launch([sys.executable, "train.py"], 4, min_workers=2, max_restarts=1))

    ``addr`` is where the workers' gloo connections listen (MASTER_ADDR; a loopback address
    keeps them on ``lo``). The store is a file only this user can open (comm/elastic.py):
    the workers find it in their environment, which other users cannot read.
    """
    from ..launcher.elastic import run_elastic
    from ..launcher.launch import worker_env

    try:
        coordinator = Coordinator.on_this_host(workers, min_workers, timeout_s)
    except (OSError, RuntimeError) as exc:
        print(f"gradsync: error: cannot create the elastic store: {exc}", file=sys.stderr,
              flush=True)
        return 2

    def env_of(uid: int) -> dict[str, str]:
        out = worker_env(uid, workers, addr, 0, env)
        del out["MASTER_PORT"]  # no store listens on a port
        out.update(coordinator.env(), GRADSYNC_ELASTIC_UID=str(uid))
        return out

    try:
        result = run_elastic(cmd, env_of, range(workers), coordinator,
                             max_restarts=max_restarts)
    finally:
        coordinator.close()
    if result.returncode == 130:
        print("gradsync: interrupted", file=sys.stderr, flush=True)
    return result.returncode


def launch_agent(cmd: list[str], host: str, port: int, nproc: int, *, max_restarts: int = 0,
                 timeout_s: float = 300.0, env: dict[str, str] | None = None) -> int:
    """Join the elastic job of the rendezvous service at ``host:port`` (`gradsync rdzv`)
    with ``nproc`` workers of ``cmd`` on this host, replace a lost one while
    ``max_restarts`` remain, and return the exit status (comm/agent.py).

    The workers reach the service's store over TCP (GRADSYNC_ELASTIC_STORE=tcp://HOST:PORT)
    and bind gloo to the interface that reaches the service (GLOO_SOCKET_IFNAME, unless
    set). An agent cut off from the service kills its workers and exits 1.
    """
    from ..comm.agent import Agent, AgentRefused
    from ..launcher.elastic import run_elastic
    from ..launcher.launch import worker_env
    from ..net import route_to

    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    extra = dict(env or {})
    try:
        addr, ifname = route_to(host, port)
        agent = Agent.register(host, port, nproc, timeout_s)
    except AgentRefused as exc:
        print(f"gradsync: {exc}; this host does not train", file=sys.stderr, flush=True)
        return 0
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"gradsync: error: cannot join the job at {endpoint}: "
              f"{str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
        return 1
    extra.setdefault("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", ifname))
    local = {uid: i for i, uid in enumerate(agent.uids)}
    print(f"gradsync: host {agent.node} ({addr}) trains workers {agent.uids} of "
          f"{agent.world}", file=sys.stderr, flush=True)

    def env_of(uid: int) -> dict[str, str]:
        local.setdefault(uid, len(local))
        out = worker_env(uid, agent.world, host, 0, extra, local_rank=local[uid],
                         local_world_size=nproc, node_rank=agent.node)
        del out["MASTER_PORT"]  # the store is the service's
        out.update({STORE_ENV: f"tcp://{endpoint}", "GRADSYNC_ELASTIC_UID": str(uid)})
        return out

    try:
        result = run_elastic(cmd, env_of, list(agent.uids), agent, max_restarts=max_restarts)
    finally:
        agent.close()
    if result.returncode == 130:
        print("gradsync: interrupted", file=sys.stderr, flush=True)
    return result.returncode


def run_local(config: TrainConfig, env: dict[str, str]) -> int:
    """`gradsync train --elastic`: start the workers here and supervise them."""
    lock = None
    if config.checkpoint.dir and config.arch == "allreduce":
        from ..checkpoint import CheckpointError

        try:  # held here for the whole run: any worker may be lost, this process is not
            lock = claim(config.checkpoint, config.workload.workload)
        except CheckpointError as exc:
            print(f"gradsync: error: {exc}", file=sys.stderr, flush=True)
            return EXIT_USAGE
    try:
        return _launch_local(config, env)
    finally:
        if lock is not None:
            lock.release()


def _launch_local(config: TrainConfig, env: dict[str, str]) -> int:
    from ..flags import to_argv
    from ..net import parse_endpoint

    launch_config = config.launch
    cmd = [sys.executable, "-m", "gradsync", "train", *to_argv(config)]
    if launch_config.rdzv_endpoint is not None:  # one host of a job across hosts
        host, port = parse_endpoint(launch_config.rdzv_endpoint, "--rdzv-endpoint")
        return launch_agent(cmd, host, port, launch_config.workers,
                            max_restarts=launch_config.max_restarts,
                            timeout_s=launch_config.timeout, env=env)
    return launch(cmd, launch_config.workers, min_workers=launch_config.min_workers,
                  max_restarts=launch_config.max_restarts, addr=launch_config.addr,
                  timeout_s=launch_config.timeout, env=env)


def run_worker(config: TrainConfig) -> dict | None:
    """Train as one elastic worker: the trainer's set-up, record and summary (loop.py) on an
    elastic membership, whose steps come from :class:`ElasticLoop`; rank 0 of the last
    generation prints the summary, which adds the membership changes. Returns the summary."""
    setup = RunSetup.from_config(config)
    # The first generation's worker count (the global batch is chosen for it): this host's
    # --workers alone, or every host's across hosts (the agent sets WORLD_SIZE).
    workload = setup.workload
    workers = int(os.environ.get("WORLD_SIZE", config.launch.workers))
    world = ElasticWorld.from_env(config.launch.timeout)
    topology = config.allreduce.topology
    if topology not in ("probe", "off"):  # a file describes the first --workers ranks (uids)
        topology = comm.Topology.load(topology).validate(workers)
    loop = ElasticLoop(
        world, workload.model, setup.optimizer_for, len(workload.train_set), setup.batch,
        workers, rescale=config.launch.elastic_rescale, seed=config.workload.seed,
        check_every=config.launch.elastic_check_every,
        allreduce={"algorithm": config.allreduce.algorithm,
                   "bucket_cap_mb": config.allreduce.bucket_cap_mb,
                   "nonfinite": config.optim.on_nonfinite,
                   "topology": topology,
                   "compression": config.compression.spec,
                   "compression_warmup": config.compression.compression_warmup,
                   "warmup_compression": config.compression.warmup_compression})
    train_set = workload.train_set
    checkpoints = _checkpoints(config, setup, loop, world.uid < workers)
    resumed = loop.position.step > 0

    def step_fn(model, indices, weight):
        x, y = default_collate([train_set[i] for i in indices])
        return setup.forward_backward(model, x, y, weight)

    steps = config.optim.steps
    run_log = RunLog(config.output, setup.total_steps(setup.steps_per_epoch(workers)))

    def on_step(record: dict) -> None:
        if loop.group.rank == 0:  # a later leader continues the metrics of the one before
            run_log.lead(done=record["step"] - 1, append=bool(loop.changes) or resumed)
        run_log.step(record, workers=record["workers"])
        if checkpoints is not None:
            checkpoints.maybe_save(loop.position, loop.optimizer, loop.group.rank,
                                   loop.group.size)

    start = time.perf_counter()
    try:
        loop.run(step_fn, steps=steps, epochs=None if steps is not None else setup.epochs,
                 on_step=on_step)
    finally:
        run_log.close()
    wall = time.perf_counter() - start
    arch, pos = loop.architecture, loop.position
    assert arch is not None
    tally = Tally(pos.step, pos.epoch, len(run_log.step_times),
                  loop.global_batch(loop.group.size), loop.optimizer.param_groups[0]["lr"],
                  waited_s=arch.comm_wait_s(), sent=arch.bytes_sent())
    summary = summarize(setup, arch, loop.wrapped, tally, run_log, wall)
    summary["elastic"] = {"generation": loop.world.gen, "members": list(loop.world.members),
                          "rescale": loop.rescale, "changes": [vars(c) for c in loop.changes]}
    if loop.group.rank == 0:
        write_summary(config.output.out, summary)
        print(format_summary(summary, arch), flush=True)
    return summary


def _checkpoints(config: TrainConfig, setup: RunSetup, loop: ElasticLoop, first: bool
                 ) -> ElasticCheckpoints | None:
    """With --checkpoint-dir: the worker's checkpoints, and with --resume the newest one
    loaded into ``loop`` (by a worker of the first generation; a replacement takes the
    members' state by broadcast instead)."""
    if not config.checkpoint.dir:
        return None
    checkpoints = ElasticCheckpoints(config.checkpoint, setup.workload.model,
                                     config.workload.workload,
                                     dataclasses.asdict(config.workload))
    if config.checkpoint.resume and first:
        position = checkpoints.resume(loop.optimizer)
        if position is not None:
            loop.position = position
    return checkpoints
