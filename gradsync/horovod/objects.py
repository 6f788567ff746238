"""Objects and parameter sets between ranks: ``broadcast_object``, ``allgather_object``,
``broadcast_parameters``, ``broadcast_optimizer_state``.

Horovod pickles objects (cloudpickle), so a rank unpickles whatever a peer sends: code
execution by whoever can speak to the port. Here an object crosses the network only as a
uint8 tensor holding one frame of fixed layout, never pickle::

    [8 bytes: n, little endian] [n bytes: JSON structure] [raw tensor bytes]

The JSON holds plain data (None, bool, int, float incl. inf/nan, str, list; tuples and
dicts tagged so they come back as tuples and dicts with their key types) and, for each
tensor, its dtype (from a fixed table), shape and offset into the raw bytes. Anything
else (a class instance, a function, a numpy array) is refused with a TypeError naming
where it sits in the object, on every rank of the call.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from .. import comm
from .basics import global_process_set, root_in
from .join import OTHER, negotiate
from .shapes import DTYPES

_DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in DTYPES}
_REFUSED = ("gradsync.horovod sends objects as JSON plus raw tensors, never pickle; "
            "send plain data (numbers, strings, lists, tuples, dicts, tensors)")


def encode(obj) -> bytes:
    """The frame of ``obj``. Raises TypeError naming what cannot be sent and where."""
    raw = bytearray()

    def enc(x, path):
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, np.generic) and not isinstance(x, np.ndarray):
            return enc(x.item(), path)
        if isinstance(x, (list, tuple)):
            items = [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]
            return {"__tuple__": items} if isinstance(x, tuple) else items
        if isinstance(x, dict):
            return {"__dict__": [[enc(k, f"{path} key"), enc(v, f"{path}[{k!r}]")]
                                 for k, v in x.items()]}
        if isinstance(x, torch.Tensor) and x.dtype in DTYPES and not x.is_sparse:
            data = x.detach().cpu().contiguous().reshape(-1)
            offset = len(raw)
            raw.extend(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
            return {"__tensor__": [offset, str(x.dtype).replace("torch.", ""),
                                   list(x.shape)]}
        raise TypeError(f"cannot send {type(x).__name__} at {path}: {_REFUSED}")

    text = json.dumps(enc(obj, "obj"), allow_nan=False).encode()
    return len(text).to_bytes(8, "little") + text + bytes(raw)


def decode(frame: bytes):
    """The object of :func:`encode`'s frame. Raises ValueError for a malformed frame."""
    n = int.from_bytes(frame[:8], "little")
    if not 0 < n <= len(frame) - 8:
        raise ValueError("malformed object frame (bad JSON length)")
    raw = memoryview(frame)[8 + n:]

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__float__" in x:
            return float(x["__float__"])
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {_key(dec(k)): dec(v) for k, v in x["__dict__"]}
        if "__tensor__" in x:
            return _tensor(raw, *x["__tensor__"])
        raise ValueError(f"malformed object frame (unknown entry {sorted(x)[:3]})")

    return dec(json.loads(bytes(frame[8:8 + n])))


def _key(k):
    return k if not isinstance(k, list) else tuple(k)  # unhashable only if malformed


def _tensor(raw: memoryview, offset: int, dtype_name: str, shape: list[int]) -> torch.Tensor:
    dtype = _DTYPE_NAMES.get(dtype_name)
    if dtype is None or any(int(d) < 0 for d in shape):
        raise ValueError(f"malformed object frame (tensor {dtype_name}{shape})")
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if not 0 <= offset <= offset + nbytes <= len(raw):
        raise ValueError("malformed object frame (tensor bytes out of range)")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    data = torch.frombuffer(bytearray(raw[offset:offset + nbytes]), dtype=torch.uint8)
    return data.view(dtype).reshape(shape)


def _frame_or_error(obj) -> tuple[int, bytes]:
    """(0, frame) or (1, the TypeError's text): a rank that cannot encode still takes part
    in the collectives, so that every rank raises instead of waiting."""
    try:
        return 0, encode(obj)
    except TypeError as exc:
        return 1, str(exc).encode()


def broadcast_object(obj, root_rank=0, name=None, process_set=global_process_set):
    """Global rank ``root_rank``'s ``obj`` on every member (root gets its own back).

    Raises:
        TypeError: on every rank, when root's object holds something that cannot be sent
            without pickle (the message says what and where).
    """
    group = process_set.resolve()
    negotiate(OTHER, process_set=process_set, name="broadcast_object")  # for hvd.join
    src = root_in(group, root_rank)
    status, frame = _frame_or_error(obj) if group.rank == src else (0, b"")
    header = torch.tensor([status, len(frame)], dtype=torch.int64)
    comm.broadcast(header, src=src, group=group)
    buf = torch.frombuffer(bytearray(frame), dtype=torch.uint8) if frame else \
        torch.empty(int(header[1]), dtype=torch.uint8)
    comm.broadcast(buf, src=src, group=group)
    if int(header[0]):
        raise TypeError(f"broadcast_object{f' {name!r}' if name else ''}: rank {root_rank} "
                        f"could not send its object: {bytes(buf.numpy()).decode()}")
    return obj if group.rank == src else decode(buf.numpy().tobytes())


def allgather_object(obj, name=None, process_set=global_process_set) -> list:
    """Every member's ``obj``, in rank order, on every member.

    Raises:
        TypeError: on every rank, naming each rank whose object cannot be sent.
    """
    group = process_set.resolve()
    negotiate(OTHER, process_set=process_set, name="allgather_object")  # for hvd.join
    status, frame = _frame_or_error(obj)
    header = torch.tensor([status, len(frame)], dtype=torch.int64)
    headers = comm.all_gather([torch.empty_like(header) for _ in range(group.size)], header,
                              group=group)
    longest = max(int(h[1]) for h in headers)
    buf = torch.zeros(longest, dtype=torch.uint8)  # (longest,) this rank's frame, padded
    buf[:len(frame)] = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
    frames = comm.all_gather([torch.empty_like(buf) for _ in range(group.size)], buf,
                             group=group)
    frames = [f[:int(h[1])].numpy().tobytes() for f, h in zip(frames, headers)]
    failed = [f"rank {group.ranks[r]}: {frames[r].decode()}"
              for r, h in enumerate(headers) if int(h[0])]
    if failed:
        raise TypeError(f"allgather_object{f' {name!r}' if name else ''}: "
                        + "; ".join(failed))
    return [decode(f) for f in frames]


def broadcast_parameters(params, root_rank=0, process_set=global_process_set) -> None:
    """Copy global rank ``root_rank``'s tensors into ``params`` on every member, in place.

    Args:
        params: a state_dict (sorted by name, as Horovod does) or a list of
            ``(name, tensor)`` pairs such as ``model.named_parameters()``.
    Raises:
        CollectiveMismatchError: ranks hold different tensors (names the first that differs).
        ValueError: an entry that is not a tensor.
    """
    group = process_set.resolve()
    negotiate(OTHER, process_set=process_set, name="broadcast_parameters")  # for hvd.join
    items = sorted(params.items()) if isinstance(params, dict) else \
        [p if isinstance(p, tuple) else (None, p) for p in params]
    named = []
    for i, (key, t) in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"broadcast_parameters: {key or i!r} is a "
                             f"{type(t).__name__}, not a tensor")
        named.append((str(key if key is not None else i), t.data))
    comm.verify_tensors(group, "parameters", named)
    src = root_in(group, root_rank)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for _, t in named:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():  # one broadcast per dtype, through a (sum of numels,) flat copy
        for tensors in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            comm.broadcast(flat, src=src, group=group)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def broadcast_optimizer_state(optimizer, root_rank=0, process_set=global_process_set):
    """Load global rank ``root_rank``'s optimizer state (hyper-parameters and per-parameter
    state such as momentum) into ``optimizer`` on every member.

    Unlike Horovod, no dummy step is needed when other ranks' state is still empty: the
    root's state_dict travels whole (through :func:`broadcast_object`) and is loaded.
    """
    group = process_set.resolve()
    root = group.rank == root_in(group, root_rank)
    state = broadcast_object(optimizer.state_dict() if root else None, root_rank,
                             "optimizer state", process_set)
    if not root:
        optimizer.load_state_dict(state)
