"""The All-Reduce architecture behind the trainer's interface: every rank is a worker, and
:class:`~gradsync.allreduce.DataParallel` averages the gradients while backward runs. The
baselines that benchmarks compare it with (torch's DDP, one process alone) live here too."""

from __future__ import annotations

from .. import comm
from ..checkpoint import CheckpointRefusedError
from ..compress.spec import make_hook
from .data_parallel import DataParallel


class AllReduceArchitecture:
    """Every process is a worker; gradients are averaged by :class:`gradsync.DataParallel`."""

    name = "allreduce"
    is_worker = True
    committer = 0
    replicated = True

    def __init__(self, group: comm.Group, *, algorithm: str = "auto",
                 bucket_cap_mb: float = 25.0, nonfinite: str = "error",
                 topology: str | None = "probe", compression: str = "none",
                 compression_warmup: int = 0):
        self.group = group
        self.worker_rank = group.rank
        self.num_workers = group.size
        self.eval_group = group
        self.checkpoint_tag = self.name
        self.algorithm, self.bucket_cap_mb, self.nonfinite = algorithm, bucket_cap_mb, nonfinite
        # "off" ignores the network; "probe" measures it; else a topology file.
        self.topology = None if topology == "off" else topology
        self.compression, self.compression_warmup = compression, compression_warmup
        self._hook_state = None
        self.model: DataParallel | None = None
        # What earlier generations measured (elastic training rebuilds the wrapper).
        self._done_wait = self._done_compress = 0.0
        self._done_bytes = self._done_skipped = 0
        self._module = None

    def prepare(self, model, make_optimizer, start_step=0):
        self.model = DataParallel(model, group=self.group, algorithm=self.algorithm,
                                  bucket_cap_mb=self.bucket_cap_mb, nonfinite=self.nonfinite,
                                  topology=self.topology)
        hook = make_hook(self.compression, self.group, self.compression_warmup)
        if hook is not None:
            self._hook_state = hook[0]
            self.model.register_comm_hook(*hook)
        return self.model, make_optimizer(self.model.parameters())

    def serve(self, model, make_optimizer, save=None, restored=None):
        raise RuntimeError("every rank of the All-Reduce architecture is a worker")

    def release(self) -> None:
        """Elastic training: drop the wrapper and every reference to its group (whose
        connections close only with the last one), keeping the module; idempotent."""
        old = self.model
        if old is None:
            return
        self._module = old.module
        self._done_wait += old.stats.comm_wait_s
        self._done_skipped += old.stats.skipped_steps
        for handle in old._handles:  # its post-accumulate-grad hooks on the parameters
            handle.remove()
        old._works = []  # (a failed step leaves its handles there)
        self._done_bytes += self.group.stats.bytes_sent
        if self._hook_state is not None:
            self._done_compress += self._hook_state.stats.compress_s
        self.model = self._hook_state = None

    def regroup(self, group: comm.Group, module=None) -> "DataParallel":
        """Elastic training: average over ``group`` (a new generation) from now on. The
        module (``module`` the first time) and its optimizer stay; the wrapper, its buckets
        and hooks are rebuilt (collective on ``group``; a comm hook's state, e.g. error
        feedback, starts afresh)."""
        self.release()
        self.group, self.worker_rank, self.num_workers = group, group.rank, group.size
        self.eval_group = group
        module = module if module is not None else self._module
        self.model = DataParallel(module, group=group, algorithm=self.algorithm,
                                  bucket_cap_mb=self.bucket_cap_mb, nonfinite=self.nonfinite,
                                  topology=self.topology)
        hook = make_hook(self.compression, group, self.compression_warmup)
        if hook is not None:
            self._hook_state = hook[0]
            self.model.register_comm_hook(*hook)
        return self.model

    def commit_checkpoint(self, step, commit, written=True):
        # Every rank's files are on disk before rank 0 commits, and the commit is done before
        # anyone goes on. A rank whose write failed (a full disk) says so in these two
        # exchanges instead of leaving, so that all stop together and it alone tells why.
        self._agree(written, f"could not write checkpoint step {step}")
        if not written:
            return  # the caller raises this rank's own error
        error = None
        if self.group.rank == 0:
            try:
                commit()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the others know
                error = exc
        self._agree(error is None, f"could not commit checkpoint step {step}")
        if error is not None:
            raise error

    def _agree(self, ok: bool, what: str) -> None:
        """Collective: raise CheckpointRefusedError on this rank if it is fine but another
        rank is not (a rank that is not fine raises its own error)."""
        failed = comm.dist_sum(0 if ok else 1, self.group)
        if failed and ok:
            raise CheckpointRefusedError(f"{failed} rank(s) {what} (their error says why)")

    def comm_wait_s(self) -> float:
        return self._done_wait + (self.model.stats.comm_wait_s if self.model is not None
                                  else 0.0)

    def bytes_sent(self) -> int:
        return self._done_bytes + self.group.stats.bytes_sent

    def compress_s(self) -> float:
        return self._done_compress + (self._hook_state.stats.compress_s
                                      if self._hook_state is not None else 0.0)

    def finish(self) -> dict:
        if self.model is None:
            return {"nonfinite_skipped": 0}
        out = {"nonfinite_skipped": self._done_skipped + self.model.stats.skipped_steps,
               "bucket_algorithms": self.model.bucket_algorithms}
        if self._hook_state is not None:
            stats = self._hook_state.stats
            out.update(compression=self.compression, compression_ratio=stats.ratio,
                       compress_s=self.compress_s(), bucket_algorithms=None)
        return out


class BaselineArchitecture(AllReduceArchitecture):
    """Baselines for benchmarks: torch's own DDP (``ddp``), or no wrapper at all on a single
    process (``local``)."""

    def __init__(self, name: str, group: comm.Group, *, bucket_cap_mb: float = 25.0,
                 compression: str = "none", compression_warmup: int = 0):
        self.name = name  # (before the base class reads it as the checkpoint tag)
        super().__init__(group, bucket_cap_mb=bucket_cap_mb)
        self.compression, self.compression_warmup = compression, compression_warmup
        if name == "local" and group.size != 1:
            raise ValueError(f"--arch local trains one process alone; the world has {group.size}")

    def prepare(self, model, make_optimizer, start_step=0):
        if self.name == "ddp":
            # torch's own hooks, for comparison: PowerSGD starts after the warm-up steps
            # (torch needs at least 2, since DDP rebuilds its buckets after step 1).
            model = comm.reference.torch_ddp(model, self.group, self.bucket_cap_mb,
                                             self.compression,
                                             max(2, self.compression_warmup))
        return model, make_optimizer(model.parameters())

    def comm_wait_s(self) -> float:
        return 0.0  # DDP's waits happen inside backward, out of sight

    def bytes_sent(self) -> int | None:
        return None if self.name == "ddp" else 0  # DDP's traffic is not visible to gradsync
