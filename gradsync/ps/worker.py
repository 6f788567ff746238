"""The worker side of the Parameter Server: push gradients, pull parameters.

Every shard is cut into partitions of a few MiB (``sharding.py``). A hook on every parameter
counts down the pieces of each partition; the moment a partition's gradients are all there
(late layers first, as backward produces them) it is pushed to its server while backward goes
on, and the receive of the server's reply to it is posted at once. A sync server sums a
partition as soon as every worker's piece of it is in and answers at once, so this worker
pulls partition c while it still pushes c + 1 (BytePS's pipelining). ``optimizer.step()``
(a :class:`RemoteOptimizer`, ``remote_optimizer.py``) waits for the replies and writes the
fresh parameters into the model: the update itself happens on the servers. Under
``compression`` the push is a half cast or the top-k entries (``compression.py``); pulls stay
full precision. ``set_timeline`` records each partition's push and pull (``trace.py``).
"""

from __future__ import annotations

import time
from functools import partial

import torch
from torch import nn

from .. import comm
from ..compress.spec import Compression
from .compression import PushCompressor, check_compression
from .protocol import (DTYPE_CODES, END_BYTES, PAYLOAD_TAG, TAG, Header, Kind, PSProtocolError,
                       ServerStats, Status, empty_header, send_message, status_text)
from .sharding import Part, ShardLayout, gather_part, scatter_part
from .trace import WorkerTrace


_END = torch.frombuffer(bytearray(END_BYTES), dtype=torch.uint8)  # the payload of DONE, CHECKPOINT


class PSWorker(nn.Module):
    """Wrap ``module`` so that backward pushes its gradients to the servers.

    Args:
        module: the model (same architecture on every worker and server).
        layout: which server holds which partitions of the flat parameters.
        servers: ranks of the servers in ``group``, server k holding shard k.
        rank: this worker's rank in ``group`` (sent in headers; the servers check it).
        start_step: steps already taken (a resumed run); pushes are numbered from it.
        compression: none, fp16, bf16 or topk:RATIO (a spec or a parsed Compression).
        compression_warmup: pushes of steps below this go out uncompressed.
        num_workers: N, the workers of the run (a half push carries gradient / N); needed
            with fp16 and bf16.
        reply_group: the group the servers answer on (same ranks as ``group``, its own
            connections; see ``architecture.py``); None: ``group``.
    """

    def __init__(self, module: nn.Module, layout: ShardLayout, servers: list[int], rank: int,
                 group: comm.Group | None = None, start_step: int = 0,
                 compression: str | Compression = "none", compression_warmup: int = 0,
                 num_workers: int | None = None, reply_group: comm.Group | None = None):
        super().__init__()
        self.module = module
        self.layout = layout
        self.servers = servers
        self.rank = rank
        self.group = group
        self.reply_group = reply_group or group
        self._params = [p for p in module.parameters() if p.requires_grad]
        for dtype in set(layout.dtypes):
            if dtype not in DTYPE_CODES:
                raise ValueError(f"the parameter server does not carry {dtype} parameters")
        # Every partition of every shard, numbered g = 0..; (k, c) -> g.
        self._parts: list[Part] = [p for k in range(len(servers)) for p in layout.parts(k)]
        self._gid = {(p.shard, p.index): g for g, p in enumerate(self._parts)}
        # A push's payload is the partition's gradient, then END: bytes (nbytes + 8,). The
        # gradient is gathered into a typed view of it; the trailer is written once.
        trailer = torch.frombuffer(bytearray(END_BYTES), dtype=torch.uint8)
        self._push_wire = [torch.empty(p.nbytes + len(END_BYTES), dtype=torch.uint8)
                           for p in self._parts]
        for wire in self._push_wire:
            wire[-len(END_BYTES):].copy_(trailer)
        self._push_bufs = [wire[:-len(END_BYTES)].view(p.dtype)
                           for wire, p in zip(self._push_wire, self._parts)]
        self._pull_bufs = [torch.empty(p.numel, dtype=p.dtype) for p in self._parts]
        self._pieces = [len(layout.pieces(p)) for p in self._parts]
        self._parts_of = [[self._gid[(p.shard, p.index)] for p in layout.parts_of(i)]
                          for i in range(len(self._params))]
        self.compression = check_compression(compression)
        self.compression_warmup = compression_warmup
        self._compressor = None
        if self.compression.name != "none":
            if self.compression.name in ("fp16", "bf16") and not num_workers:
                raise ValueError(f"--compression {self.compression} needs num_workers")
            self._compressor = PushCompressor(self.compression, [p.numel for p in self._parts],
                                              [p.dtype for p in self._parts], num_workers or 1)
        self.versions = [0] * len(self._parts)  # per partition, as its last reply said
        self.start_step = start_step
        self.step_count = start_step
        self.comm_wait_s = 0.0
        self.bytes_pushed = 0  # payloads as sent, compressed or not (without END)
        self.bytes_dense = 0   # what the same pushes would have sent uncompressed
        self.compress_s = 0.0  # encoding pushes, inside backward
        self.bytes_pulled = 0
        self._works: list[comm.Work] = []
        # Receives posted, in posting order: a server answers in the order we pushed.
        self._replies: list[tuple[int, torch.Tensor, comm.Work, comm.Work]] = []
        self._posted: set[int] = set()
        self._trace: WorkerTrace | None = None  # --timeline (set_timeline)
        self._reset()
        self._pull_all()  # the servers' initial values, so every replica starts equal
        for i, p in enumerate(self._params):
            p.register_post_accumulate_grad_hook(partial(self._on_grad, i))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def set_timeline(self, timeline) -> None:
        """Record each partition's push and pull in ``timeline`` (a
        :class:`gradsync.observe.Timeline`, flushed by the caller once per step; None stops;
        ``trace.py``)."""
        self._trace = None if timeline is None else WorkerTrace(timeline, self._parts,
                                                                self.servers)

    # --- push ---------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._remaining = list(self._pieces)
        self._left = [len(self.layout.parts(k)) for k in range(len(self.servers))]
        self._pushed = [False] * len(self.servers)  # every partition of shard k pushed
        self._done: set[int] = set()  # partitions pushed this step
        self._seen: set[int] = set()
        self._callback_queued = False

    def _on_grad(self, i: int, param: torch.Tensor) -> None:
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True
        if i in self._seen:
            return
        self._seen.add(i)
        for g in self._parts_of[i]:
            self._remaining[g] -= 1
            if self._remaining[g] == 0:
                self._push(g)

    def _push(self, g: int) -> None:
        if self._trace is None:
            self._send_push(g)
            return
        start = time.perf_counter()
        self._trace.push(g, start, self._send_push(g), self.step_count)

    def _send_push(self, g: int) -> int:
        """Push partition ``g``; returns its payload's bytes as sent."""
        part = self._parts[g]
        k = part.shard
        # Gradients not there yet (None) are parameters without one this step: zeros.
        payload = gather_part([p.grad for p in self._params], self.layout, part,
                              self._push_bufs[g])
        kind, code, numel, wire = Kind.PUSH, DTYPE_CODES[part.dtype], payload.numel(), \
            self._push_wire[g]
        if self._compressor is not None and self.step_count >= self.compression_warmup:
            start = time.perf_counter()
            kind, code, numel, wire = self._compressor.encode(g, payload)  # may change payload
            self.compress_s += time.perf_counter() - start
        header = Header(kind, step=self.step_count, shard=k, numel=numel,
                        version=self.versions[g], sender=self.rank, dtype=code,
                        partition=part.index)
        self._send(k, header, wire, f"push of shard {k} at step {self.step_count}")
        nbytes = wire.numel() - len(END_BYTES)
        self.bytes_pushed += nbytes
        self.bytes_dense += payload.numel() * payload.element_size()
        self._post_reply(g)
        self._done.add(g)
        self._left[k] -= 1
        self._pushed[k] = self._left[k] == 0
        return nbytes

    def _send(self, k: int, header: Header, payload: torch.Tensor | None, what: str) -> None:
        self._works += send_message(header, payload, self.servers[k], self.group, what)

    def _wait_sends(self) -> None:
        for work in self._works:
            work.wait()
        self._works.clear()

    def _post_reply(self, g: int) -> None:
        k = self._parts[g].shard
        header, what = empty_header(), f"pull of shard {k} at step {self.step_count}"
        hw = comm.irecv(header, self.servers[k], self.reply_group, TAG, what=what)
        pw = comm.irecv(self._pull_bufs[g], self.servers[k], self.reply_group, PAYLOAD_TAG,
                        what=what)
        self._replies.append((g, header, hw, pw))
        self._posted.add(g)

    def _finish_backward(self) -> None:
        # Partitions whose parameters got no gradient this step still go out (as zeros), so
        # every server hears from every worker about every partition at every step.
        for g in range(len(self._parts)):
            if g not in self._done:
                self._push(g)

    # --- pull ---------------------------------------------------------------------------------

    def _pull_all(self) -> None:
        for g in range(len(self._parts)):
            if g not in self._posted:
                self._post_reply(g)
        start, trace = time.perf_counter(), self._trace
        for reply in self._replies:
            if trace is None:
                self._load(*reply)
            else:
                t = time.perf_counter()
                self._load(*reply)
                trace.pull(reply[0], t, self.step_count, self.versions[reply[0]])
        self._replies.clear()
        self._posted.clear()
        self._wait_sends()
        end = time.perf_counter()
        self.comm_wait_s += end - start
        if trace is not None:
            trace.waited(start, end, self.step_count)

    def _load(self, g: int, header: torch.Tensor, hw: comm.Work, pw: comm.Work) -> None:
        """Wait for partition ``g``'s reply and write its parameters into the model."""
        part = self._parts[g]
        k = part.shard
        hw.wait()
        pw.wait()
        h = Header.decode(header)
        if h.kind == Kind.ERROR:
            raise PSProtocolError(f"server {k} (rank {self.servers[k]}) rejected rank "
                                  f"{self.rank}'s message: {status_text(h.status)}")
        if h.kind != Kind.PARAMS or h.shard != k or h.partition != part.index:
            raise PSProtocolError(f"unexpected reply from server {k}: kind {h.kind}, "
                                  f"shard {h.shard}, partition {h.partition}")
        scatter_part(self._pull_bufs[g], self.layout, part, self._params)
        self.versions[g] = h.version
        self.bytes_pulled += part.nbytes

    def step(self) -> None:
        """Finish the step: wait for every server's parameters and load them."""
        if not all(self._pushed):
            raise RuntimeError("optimizer.step() before backward(): nothing was pushed")
        self._pull_all()
        self.step_count += 1
        self._reset()

    def checkpoint(self, step: int) -> bool:
        """Between steps, after this worker's checkpoint files are on disk: ask every server
        to save its shard of ``step`` and wait until all have.

        Returns:
            True when every server saved with every worker present; False when a worker was
            dropped (async/ssp), so the checkpoint lacks that worker's state.
        """
        if step != self.step_count:
            raise ValueError(f"checkpoint of step {step} asked at step {self.step_count}")
        for k in range(len(self.servers)):
            self._send(k, Header(Kind.CHECKPOINT, step=step, shard=k, sender=self.rank), _END,
                       f"checkpoint of step {step}")
        complete = True
        for k, server in enumerate(self.servers):
            header = empty_header()
            comm.recv(header, server, self.reply_group, TAG, what=f"checkpoint of step {step}")
            h = Header.decode(header)
            if h.kind == Kind.ERROR:
                raise PSProtocolError(f"server {k} (rank {server}) rejected the checkpoint "
                                      f"request of step {step}: "
                                      f"{status_text(h.status)}")
            if h.kind != Kind.SAVED or h.shard != k or h.step != step:
                raise PSProtocolError(f"server {k} (rank {server}) did not save step {step}: "
                                      f"it answered kind {h.kind}, status {h.status}")
            complete &= h.status == Status.OK
        self._wait_sends()
        return complete

    def finish(self) -> list[ServerStats]:
        """Tell the servers this worker is done and collect their statistics."""
        stats = []
        for k, server in enumerate(self.servers):
            self._send(k, Header(Kind.DONE, step=self.step_count, sender=self.rank), _END,
                       "end of training")
        for k, server in enumerate(self.servers):
            header, buf = empty_header(), torch.empty(ServerStats.size(), dtype=torch.float64)
            comm.recv(header, server, self.reply_group, TAG, what="end of training")
            comm.recv(buf, server, self.reply_group, PAYLOAD_TAG, what="end of training")
            stats.append(ServerStats.from_tensor(buf))
        self._wait_sends()
        return stats
