"""Sharded checkpoints: each rank writes its shard, a metadata file commits them, and the
checkpoint loads into the same world, into another world size (re-sharded), or into a plain
module for serving.

    directory/
        shard-00000-of-00004.pt   rank r's piece (k,) of every bucket, padding included; its
                                  optimizer state per bucket ((real,) tensors for element-wise
                                  keys, 0-d ones whole) and hyper-parameters; rank 0's also
                                  the replicated tensors (buffers, frozen parameters)
        meta.json                 format, world size, stage, buckets (dtype, numel, k, each
                                  parameter's name, shape, offset), each shard's sha256 and
                                  size; written last: the checkpoint exists once it does

Names: ShardedDataParallel's ``save_sharded(dir)`` / ``load_sharded(dir)`` and
:func:`full_state_dict` (a plain module's state dict), beside torch.distributed.checkpoint's
``save`` / ``load``, whose directories these are not. Files are written with
gradsync/checkpoint/format.py's steps (a new file, never through a symlink, fsynced, then
renamed, then the directory fsynced) and read with its ``read_file`` (size and sha256
against meta.json, then ``torch.load(weights_only=True)``); the digests reach rank 0 as
int64 tensors, so no rank unpickles anything a peer sent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import comm
from ..checkpoint.format import (CheckpointError, IncompatibleCheckpointError, check_loadable,
                                 fsync_dir, open_new, read_file, write_fsynced)

META, FORMAT = "meta.json", 1


def shard_name(rank: int, size: int) -> str:
    return f"shard-{rank:05d}-of-{size:05d}.pt"


def describe_layout(sdp) -> list[dict]:
    """The buckets as meta.json records them (JSON: names, shapes, offsets)."""
    return [{"dtype": str(b.flat.dtype).removeprefix("torch."), "numel": b.numel, "k": b.k,
             "params": [{"name": sdp.param_names[id(p)], "shape": list(shape), "offset": off}
                        for p, shape, off in zip(b.params, b.shapes, b.offsets)]}
            for b in sdp.buckets]


def _own_piece(b) -> torch.Tensor:
    """(k,) this rank's piece with its padding, in storage of its own (a view would save
    the whole bucket)."""
    return (b.shard if b.shard is not None else b.pieces(b.flat)[b.rank]).detach().clone()


def _piece_states(opt) -> list[dict]:
    """The inner optimizer's state of each bucket's piece: element-wise (real,) tensors and
    0-d ones (Adam's step); anything else cannot be cut by elements."""
    out = []
    for b in opt.buckets:
        state = opt.optimizer.state.get(b.piece, {}) if b.piece is not None else {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != b.piece.shape:
                raise ValueError(f"optimizer state {key!r} of shape {tuple(value.shape)} is not "
                                 f"element-wise (piece {tuple(b.piece.shape)}): cannot shard it")
        out.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()})
    return out


def _replicated(sdp) -> dict[str, torch.Tensor]:
    """Buffers and frozen parameters: the same on every rank, saved by rank 0."""
    sharded = set(sdp.param_names)
    return {name: t.detach().clone() for name, t in
            sdp.module.state_dict(keep_vars=True).items() if id(t) not in sharded}


def save_sharded(sdp, directory: str | Path) -> None:
    """Write this rank's shard and, on rank 0, meta.json last (collective)."""
    directory, group = Path(directory), sdp.group
    rank, n = group.rank, group.size
    if rank == 0:  # an older meta.json would vouch for files this save replaces
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / META).exists():
            (directory / META).unlink()
            fsync_dir(directory)
    comm.barrier(group=group)
    groups = [{k: v for k, v in g.items() if k != "params"}
              for g in sdp.optimizer.optimizer.state_dict()["param_groups"]]
    shard = {"pieces": [_own_piece(b) for b in sdp.buckets],
             "state": _piece_states(sdp.optimizer), "param_groups": groups,
             "replicated": _replicated(sdp) if rank == 0 else {}}
    check_loadable(shard, "shard")
    name = shard_name(rank, n)
    tmp = directory / f"{name}.tmp"
    entry = write_fsynced(tmp, shard)
    os.replace(tmp, directory / name)
    fsync_dir(directory)
    # (33,) int64: the 32 bytes of the sha256, then the size; every rank's, to rank 0.
    mine = torch.tensor([*bytes.fromhex(entry["sha256"]), entry["bytes"]], dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(n)]
    comm.all_gather(every, mine, group=group)
    if rank == 0:
        files = {shard_name(r, n): {"sha256": bytes(t[:32].tolist()).hex(), "bytes": int(t[32])}
                 for r, t in enumerate(every)}
        _write_meta(directory, {"format": FORMAT, "world_size": n, "stage": sdp.stage,
                                "buckets": describe_layout(sdp), "files": files})
    comm.barrier(group=group)  # nobody returns before the checkpoint is committed


def _write_meta(directory: Path, meta: dict) -> None:
    tmp = directory / f"{META}.tmp"
    with os.fdopen(open_new(tmp), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / META)
    fsync_dir(directory)


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta["format"] != FORMAT:
            raise CheckpointError(f"{path}: format {meta['format']!r}, not {FORMAT}")
        n = meta["world_size"]
        if type(n) is not int or n < 1 or sorted(meta["files"]) != sorted(
                shard_name(r, n) for r in range(n)):
            raise ValueError("world_size and files disagree")
        for b in meta["buckets"]:
            if not (b["numel"] <= n * b["k"] and all(p["offset"] + _numel(p["shape"])
                                                     <= b["numel"] for p in b["params"])):
                raise ValueError(f"bucket {b} does not fit its pieces")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (no sharded checkpoint, or its save never "
                              "finished)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable or malformed: {exc}") from None
    return meta


def _numel(shape) -> int:
    return torch.Size(shape).numel()


def _read_shard(directory: Path, meta: dict, r: int) -> dict:
    name = shard_name(r, meta["world_size"])
    return read_file(directory / name, meta["files"][name])


def reassemble(directory: str | Path) -> tuple[dict, dict, dict, list]:
    """Every saved piece back into whole tensors, per parameter name.

    Returns:
        params {name: tensor of its shape}; state {name: {key: (numel,)}} for element-wise
        keys; scalars {name: {key: value}}; rank 0's param_groups and replicated tensors
        as the last item, a pair.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    shards = [_read_shard(directory, meta, r) for r in range(meta["world_size"])]
    params, state, scalars = {}, {}, {}
    for j, b in enumerate(meta["buckets"]):
        # (N_old * k,) the saved bucket; its first numel elements are real.
        flat = torch.cat([s["pieces"][j] for s in shards])[:b["numel"]]
        states = [s["state"][j] for s in shards if s["state"][j]]
        keys = {k for st in states for k, v in st.items() if torch.is_tensor(v) and v.dim()}
        flat_state = {k: torch.cat([st[k] for st in states]) for k in keys}
        for p in b["params"]:
            lo, hi = p["offset"], p["offset"] + _numel(p["shape"])
            params[p["name"]] = flat[lo:hi].view(p["shape"])
            state[p["name"]] = {k: v[lo:hi] for k, v in flat_state.items()}
            scalars[p["name"]] = {k: v for k, v in (states[0] if states else {}).items()
                                  if k not in keys}
    return params, state, scalars, [shards[0]["param_groups"], shards[0]["replicated"]]


def full_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """A plain module's state dict (whole parameters, buffers) from a sharded checkpoint,
    in one process: ``model.load_state_dict(full_state_dict(dir))`` for serving."""
    params, _, _, (_, replicated) = reassemble(directory)
    return {**{k: v.clone() for k, v in params.items()}, **replicated}


def load_sharded(sdp, directory: str | Path) -> None:
    """Restore parameters and optimizer state from ``directory`` (collective). Written by
    the same world size with the same layout: each rank reads only its own file. Otherwise
    every rank reads every file, reassembles whole tensors (a transient full copy of model
    and optimizer state) and cuts its pieces for this layout.

    Raises:
        CheckpointError: missing, truncated or altered files.
        IncompatibleCheckpointError: another model (names, shapes or dtypes differ).
    """
    directory, group = Path(directory), sdp.group
    meta = read_meta(directory)
    if meta["world_size"] == group.size and meta["buckets"] == describe_layout(sdp):
        own = _read_shard(directory, meta, group.rank)
        pieces, states, groups = own["pieces"], own["state"], own["param_groups"]
        replicated = own["replicated"]  # rank 0's file holds them; {} elsewhere
    else:
        params, state, scalars, (groups, replicated) = reassemble(directory)
        _check_names(sdp, params, directory)
        pieces, states = _cut(sdp, params, state, scalars)
    _apply(sdp, pieces, states, groups)
    current = sdp.module.state_dict(keep_vars=True)
    with torch.no_grad():  # buffers and frozen parameters: rank 0's, as at construction
        for name in _replicated(sdp):
            if group.rank == 0:
                current[name].copy_(replicated[name])
            comm.broadcast(current[name], src=0, group=group)
    if sdp.stage < 3:  # stage 3 gathers before each use
        sdp.optimizer.gather_parameters()


def _check_names(sdp, params: dict, directory: Path) -> None:
    want = {sdp.param_names[id(p)]: (tuple(shape), b.flat.dtype)
            for b in sdp.buckets for p, shape in zip(b.params, b.shapes)}
    found = {name: (tuple(t.shape), t.dtype) for name, t in params.items()}
    if want != found:
        diff = sorted(set(want.items()) ^ set(found.items()))[:3]
        raise IncompatibleCheckpointError(f"{directory}: checkpoint of another model: "
                                          f"(name, (shape, dtype)) differ, e.g. {diff}")


def _cut(sdp, params: dict, state: dict, scalars: dict) -> tuple[list, list]:
    """This rank's (k,) piece and its optimizer state of each bucket of this layout."""
    pieces, states = [], []
    for b in sdp.buckets:
        names = [sdp.param_names[id(p)] for p in b.params]

        def flat_of(tensors: list[torch.Tensor]) -> torch.Tensor:
            flat = torch.zeros(b.size * b.k, dtype=tensors[0].dtype)  # (N * k,)
            for t, off in zip(tensors, b.offsets):
                flat[off:off + t.numel()] = t.reshape(-1)
            return flat

        pieces.append(b.pieces(flat_of([params[n] for n in names]))[b.rank].clone())
        real, lo = b.real(b.rank), b.rank * b.k
        st = {}
        if real and state[names[0]]:
            st = {key: flat_of([state[n][key] for n in names])[lo:lo + real].clone()
                  for key in state[names[0]]}
            # A copy per piece: Adam adds 1 to its ``step`` tensor in place, so pieces that
            # shared one saved object would count each step once per piece.
            st.update({k: v.clone() if torch.is_tensor(v) else v
                       for k, v in scalars[names[0]].items()})
        states.append(st)
    return pieces, states


def _apply(sdp, pieces: list, states: list, groups: list) -> None:
    with torch.no_grad():
        for b, piece in zip(sdp.buckets, pieces, strict=True):
            if piece.shape != (b.k,) or piece.dtype != b.flat.dtype:
                raise CheckpointError(f"bucket {b.index}: piece {tuple(piece.shape)} "
                                      f"{piece.dtype}, this layout's is ({b.k},) {b.flat.dtype}")
            (b.shard if b.shard is not None else b.pieces(b.flat)[b.rank]).copy_(piece)
    own = [st for b, st in zip(sdp.buckets, states) if b.piece is not None]
    sdp.optimizer.optimizer.load_state_dict({
        "state": {i: st for i, st in enumerate(own) if st},
        "param_groups": [{**g, "params": list(range(len(own)))} for g in groups]})
