"""`gradsync train --zero 1|2|3`: the All-Reduce architecture with ShardedDataParallel.

Why a class of its own here, picked by ``--arch allreduce --zero N`` (AllReduceArchitecture's
``from_config`` hands over to it), rather than a branch inside AllReduceArchitecture or a
new ``--arch zero``: ZeRO is data parallelism over the same ranks, data shards, algorithm,
bucket size and topology, so it stays a setting of ``--arch allreduce`` (one table of
architectures, one flag section), while what differs (no DataParallel statistics, no comm
hooks, no elastic regrouping, an optimizer whose state is sharded) would have spread
``if zero`` through every method of AllReduceArchitecture. This module imports nothing of
allreduce/architecture.py, so the hand-over is no import circle.

The run's optimizer factory ``make_optimizer(params)`` is ShardedDataParallel's
``optimizer_class`` as it is (called with this rank's pieces and no keyword arguments).

Checkpoints: the trainer's Checkpointer writes the replicated state on the committer and only
RNG streams per rank, and a commit removes any other file from the staging directory. So a
sharded run consolidates, as torch's ``ZeroRedundancyOptimizer.consolidate_state_dict``
does: after each step that a checkpoint follows (``--checkpoint-every``), the ranks gather
their optimizer state onto rank 0, which then saves it in the format of a plain optimizer
over the whole model (stage 3 also gathers the parameters for the model's state dict). The
checkpoint is an ordinary All-Reduce one: atomic commit, lock, fresh-run guard, resume
bitwise exact, also on another worker count or without ``--zero``. The cost: at those steps
rank 0 briefly holds the whole optimizer state, the memory ZeRO saves otherwise.
"""

from __future__ import annotations

import hashlib

import torch

from .. import comm
from ..checkpoint.protocol import commit_agreed
from . import STAGES, ShardedDataParallel  # (the package: sharded.py imports it back)


def check_zero(config) -> None:
    """What ``--zero N`` cannot run with in ``config`` (a TrainConfig): one ValueError."""
    if not config.allreduce.zero:
        return
    refusals = (
        (config.arch != "allreduce", f"is built for --arch allreduce, not --arch {config.arch}"),
        (config.launch.elastic, "does not run --elastic (a changing membership would have to "
                                "re-shard the optimizer state)"),
        (config.compression.spec.name != "none", "takes no --compression: compression hooks "
                                                 "are not built for sharded runs"),
        (config.launch.engine == "mpi", "is not tested under --engine mpi; use the torch "
                                        "engine"),
        (config.optim.on_nonfinite == "skip", "cannot --on-nonfinite skip: sharded runs do "
                                              "not check gradients for NaN or Inf"),
    )
    for refused, why in refusals:
        if refused:
            raise ValueError(f"--zero {config.allreduce.zero} {why}")


class ZeroArchitecture:
    """Every process is a worker; ShardedDataParallel of ``stage`` averages the gradients
    and each rank steps its shard of the optimizer. ``checkpoint_every``: the steps after
    which the optimizer state is consolidated on rank 0 for the Checkpointer."""

    name = "allreduce"
    is_worker = True
    committer = 0
    replicated = True
    checkpoint_tag = "allreduce"  # the checkpoints are an All-Reduce run's

    def __init__(self, group: comm.Group, stage: int, *, algorithm: str = "auto",
                 bucket_cap_mb: float = 25.0, topology="probe",
                 checkpoint_every: int | None = None):
        if stage not in STAGES:
            raise ValueError(f"--zero must be one of {STAGES}, got {stage}")
        self.group, self.stage = group, stage
        self.worker_rank, self.num_workers, self.eval_group = group.rank, group.size, group
        self.algorithm, self.bucket_cap_mb = algorithm, bucket_cap_mb
        self.topology = None if topology == "off" else topology
        self.checkpoint_every = checkpoint_every
        self.model: ShardedDataParallel | None = None
        self.optimizer: ConsolidatingOptimizer | None = None

    @classmethod
    def from_config(cls, config, group: comm.Group, links=None) -> "ZeroArchitecture":
        return cls(group, config.allreduce.zero, algorithm=config.allreduce.algorithm,
                   bucket_cap_mb=config.allreduce.bucket_cap_mb,
                   topology=config.allreduce.topology, checkpoint_every=config.checkpoint.every)

    def prepare(self, model, make_optimizer, start_step=0):
        self.model = ShardedDataParallel(model, make_optimizer, stage=self.stage,
                                         group=self.group, bucket_cap_mb=self.bucket_cap_mb,
                                         algorithm=self.algorithm, topology=self.topology)
        self.optimizer = ConsolidatingOptimizer(self.model, self.checkpoint_every, start_step)
        return self.model, self.optimizer

    def serve(self, model, make_optimizer, save=None, restored=None):
        raise RuntimeError("every rank of the All-Reduce architecture is a worker")

    def commit_checkpoint(self, step, commit, written=True):
        commit_agreed(self.group, step, commit, written)

    def comm_wait_s(self) -> float:
        """Waiting on communication: backward's end for its reduce-scatters, and stages
        1-2's waits for the all-gather of the parameters after the step (in the next
        forward's layers, or wherever parameters were read first)."""
        if self.model is None or self.optimizer is None:
            return 0.0
        regather = self.model.optimizer.regather
        return self.model.comm_wait_s + (regather.wait_s if regather is not None else 0.0)

    def bytes_sent(self) -> int:
        return self.group.stats.bytes_sent

    def compress_s(self) -> float:
        return 0.0

    def finish(self) -> dict:
        out = {"algorithm": self.algorithm, "nonfinite_skipped": 0, "zero_stage": self.stage}
        if self.model is not None:  # the summary digests the parameters after this
            self.model.wait_for_parameters()
        if self.model is not None and self.stage == 3:
            # At rest a stage-3 module's parameters are empty: digest and count them whole
            # (collective; the summary takes these over its own).
            with self.model.gatherer.gathered():
                out["parameters_sha1"] = _digest(self.model.module)
                out["parameters"] = sum(p.numel() for p in self.model.module.parameters())
        return out

    def summary_head(self, s: dict) -> str:
        return f"allreduce, ZeRO stage {s['zero_stage']}, algorithm {s['algorithm']}"

    def summary_lines(self, s: dict) -> list[str]:
        return []


def _digest(module: torch.nn.Module) -> str:
    """train/loop.py's ``parameters_digest`` (which this module cannot import: train/
    imports it through the config), on copies: a tensor seen by numpy keeps its storage
    from being freed again."""
    digest = hashlib.sha1()
    for _, p in module.named_parameters():
        digest.update(p.detach().clone().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ConsolidatingOptimizer:
    """The ShardedOptimizer of ``sdp`` as the trainer steps it. After every step that a
    checkpoint follows (every ``every`` steps, counting from ``start_step``) the optimizer
    state (and, stage 3, the parameters) is gathered onto rank 0, whose :meth:`state_dict`
    returns it as a plain optimizer over ``sdp.module.parameters()`` would;
    :meth:`load_state_dict` takes such a state and keeps this rank's pieces of it."""

    def __init__(self, sdp: ShardedDataParallel, every: int | None, start_step: int = 0):
        self.sdp, self.inner, self.every, self.steps = sdp, sdp.optimizer, every, start_step
        self._full: dict | None = None
        self._full_model: dict | None = None
        self._params = list(sdp.module.parameters())
        if sdp.stage == 3 and sdp.group.rank == 0:
            # (a function: torch marks its hooks with an attribute, which a method cannot take)
            sdp.module.register_state_dict_post_hook(
                lambda *args: self._whole_parameters(*args))

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        loss = self.inner.step(closure)  # stages 1-2: the all-gather left running
        self.steps += 1
        if self.every and self.steps % self.every == 0:
            self._full = _consolidate(self.sdp, self._params)
            if self.sdp.stage == 3:
                self._full_model = None  # (the hook must not fill the gather below)
                whole = self.sdp.state_dict()  # collective: gathers, copies, frees
                self._full_model = whole if self.sdp.group.rank == 0 else None
        return loss

    def _whole_parameters(self, module, state_dict, prefix, local_metadata) -> None:
        """Stage 3, rank 0: the module's state dict with the parameters gathered at the
        last checkpoint step instead of the empty ones at rest."""
        if self._full_model is not None:
            for key, value in self._full_model.items():
                state_dict[prefix + key] = value

    def state_dict(self) -> dict:
        """Rank 0, after a step that a checkpoint follows: the whole optimizer state."""
        if self._full is None:
            raise RuntimeError("a sharded optimizer's whole state is gathered only after the "
                               "steps that a checkpoint follows (--checkpoint-every), on rank 0")
        return self._full

    def load_state_dict(self, state_dict: dict) -> None:
        _load_pieces(self.sdp, self._params, state_dict)


def _own_states(sdp) -> list[dict]:
    return [sdp.optimizer.optimizer.state.get(b.piece, {}) if b.piece is not None else {}
            for b in sdp.buckets]


def _consolidate(sdp, params: list) -> dict | None:
    """Every rank's optimizer state of each bucket onto rank 0 (collective), as a plain
    optimizer's state dict over ``params``; None on the other ranks."""
    group, index = sdp.group, {id(p): i for i, p in enumerate(params)}
    own = _own_states(sdp)
    keys = sorted({k for st in own for k, v in st.items() if torch.is_tensor(v) and v.dim()})
    state = {}
    for b, st in zip(sdp.buckets, own):
        whole = {}
        for key in keys:
            mine = torch.zeros(b.k, dtype=b.flat.dtype)
            if key in st:
                mine[:st[key].numel()] = st[key]
            parts = [torch.empty_like(mine) for _ in range(group.size)] if not group.rank else None
            comm.gather(mine, parts, dst=0, group=group)
            whole[key] = torch.cat(parts) if parts else None
        if group.rank:
            continue
        # Rank 0's piece is the first k elements of every bucket: it holds the 0-d keys.
        scalars = {k: v for k, v in st.items() if k not in keys}
        for p, shape, off in zip(b.params, b.shapes, b.offsets):
            n = torch.Size(shape).numel()
            state[index[id(p)]] = {**{k: v.clone() if torch.is_tensor(v) else v
                                      for k, v in scalars.items()},
                                   **{k: t[off:off + n].view(shape).clone()
                                      for k, t in whole.items()}}
    if group.rank:
        return None
    groups = sdp.optimizer.optimizer.state_dict()["param_groups"]
    return {"state": state, "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                              "params": list(range(len(params)))}
                                             for g in groups[:1]]}


def _load_pieces(sdp, params: list, full: dict) -> None:
    """This rank's pieces of a plain optimizer's ``full`` state over ``params``."""
    index = {id(p): i for i, p in enumerate(params)}
    states = []
    for b in sdp.buckets:
        if b.piece is None:
            continue
        saved = [full["state"].get(index[id(p)], {}) for p in b.params]
        if not saved[0]:
            states.append({})
            continue
        lo, real, st = b.rank * b.k, b.real(b.rank), {}
        for key, first in saved[0].items():
            if torch.is_tensor(first) and first.dim():
                flat = torch.zeros(b.size * b.k, dtype=first.dtype)
                for s, off in zip(saved, b.offsets):
                    flat[off:off + s[key].numel()] = s[key].reshape(-1)
                st[key] = flat[lo:lo + real].clone()
            else:  # a copy per piece: Adam steps its ``step`` tensor in place
                st[key] = first.clone() if torch.is_tensor(first) else first
        states.append(st)
    hyper = {k: v for k, v in full["param_groups"][0].items() if k != "params"}
    sdp.optimizer.optimizer.load_state_dict({
        "state": {i: st for i, st in enumerate(states) if st},
        "param_groups": [{**hyper, "params": list(range(len(states)))}]})
