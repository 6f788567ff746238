"""The on-disk format of a checkpoint: its errors, its meta data, and the file-level
steps (fsynced writes, checksums, the COMMITTED marker) that checkpoint.py composes."""


from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "COMMITTED"
STATE_FILE = "state.pt"
STEP_DIR_RE = re.compile(r"^step-(\d{8,})(\.tmp)?$")
META_TYPES = {"step": int, "epoch": int, "workload": str, "world_size": int, "arch": str,
               "param_fingerprint": str}
SETTING_TYPES = (str, int, float, bool)  # JSON scalars: the marker is JSON
# Types that torch.load(weights_only=True) rebuilds; checked at save time so that a state
# which would only fail to load at resume (the worst moment) fails when it is written.
LEAVES = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)
# Every file a save writes is created anew, never opened through a symlink (issue 22).
OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the one-line message names the file and the fault."""


class CheckpointRefusedError(CheckpointError):
    """On the ranks that did not choose: the rank that chose the checkpoint found it unusable
    and says why in its own error (so the run prints the reason once)."""


class IncompatibleCheckpointError(CheckpointError):
    """An intact checkpoint of another workload, model, architecture or world size."""


@dataclass(frozen=True)
class CheckpointMeta:
    """What identifies a checkpoint and decides whether a run may resume from it.

    Args:
        step: optimizer steps taken when the checkpoint was written.
        epoch: epoch in progress at that step.
        workload: workload name, e.g. "digits-mlp".
        world_size: number of ranks that wrote it.
        arch: architecture name, e.g. "allreduce".
        param_fingerprint: `model_fingerprint` of the model.
        settings: what the workload was built with, e.g. ``{"workload": "digits-wide",
            "hidden": 256, "dtype": "float64", "seed": 0}``, so that a reader (``gradsync
            serve``) builds the same model; None in checkpoints written before it was
            recorded. Not compared on resume: the fingerprint already tells models apart.
    """

    step: int
    epoch: int
    workload: str
    world_size: int
    arch: str
    param_fingerprint: str
    settings: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.step < 0 or self.epoch < 0:
            raise ValueError(f"step and epoch must be >= 0, got {self.step}, {self.epoch}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.settings is not None and (type(self.settings) is not dict or any(
                type(k) is not str or type(v) not in SETTING_TYPES
                for k, v in self.settings.items())):
            raise ValueError(f"settings must map names to str, int, float or bool, got "
                             f"{self.settings!r}")


def model_fingerprint(model: torch.nn.Module) -> str:
    """Return a sha1 over the (name, shape, dtype) of every entry of `model.state_dict()`.

    Pass the bare model, not a wrapper that prefixes names (`module.`), so that the same
    model gives the same fingerprint however it is parallelised.

    Args:
        model: the module whose parameters and persistent buffers are checkpointed.

    Returns:
        40 hex digits; equal for models whose state dicts load into each other.
    """
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
    return digest.hexdigest()


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a wrapper whose state dict prefixes its names (torch's DDP:
    ``module.``); gradsync's wrappers already give their module's names."""
    inner = getattr(model, "module", None)
    if isinstance(inner, torch.nn.Module) and all(
            k.startswith("module.") for k in model.state_dict()):
        return inner
    return model


def step_dirname(step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:08d}"


def same_run(a: CheckpointMeta, b: CheckpointMeta) -> bool:
    """Whether two checkpoints belong to one run: same workload, architecture and model."""
    return (a.workload, a.arch, a.param_fingerprint) == (b.workload, b.arch, b.param_fingerprint)


def check_compatible(found: CheckpointMeta, expect: CheckpointMeta, path: Path,
                      allow_reshard: bool) -> None:
    diffs = [f"{name} {getattr(found, name)!r} (this run: {getattr(expect, name)!r})"
             for name in ("workload", "arch", "param_fingerprint")
             if getattr(found, name) != getattr(expect, name)]
    if diffs:
        raise IncompatibleCheckpointError(f"{path}: checkpoint of another run: "
                                          + ", ".join(diffs))
    if found.world_size != expect.world_size and not allow_reshard:
        raise IncompatibleCheckpointError(
            f"{path}: written by {found.world_size} ranks, this run has "
            f"{expect.world_size}; allow_reshard=True resumes the replicated state "
            "without the per-rank RNG states")


def write_marker(path: Path, meta: CheckpointMeta, files: dict[str, dict[str, Any]]) -> None:
    """Write ``path/COMMITTED`` through a temporary name (fsync, rename, fsync): the moment
    it exists, the checkpoint counts."""
    marker = {"format": FORMAT_VERSION, "meta": asdict(meta), "files": files}
    tmp = path / f"{MARKER}.tmp"
    with os.fdopen(open_new(tmp), "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MARKER)
    fsync_dir(path)
    fsync_dir(path.parent)


def read_marker(path: Path, step: int, *, check_sizes: bool
                 ) -> tuple[CheckpointMeta, dict[str, dict[str, Any]]]:
    """Parse and validate `path/COMMITTED`; with `check_sizes`, stat the listed files."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    marker = path / MARKER
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{marker}: missing (the save never committed)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{marker}: unreadable: {exc}") from None
    try:
        if data["format"] != FORMAT_VERSION:
            raise CheckpointError(f"{marker}: format {data['format']!r}, this gradsync "
                                  f"reads format {FORMAT_VERSION}")
        fields = data["meta"]
        for name, typ in META_TYPES.items():
            if type(fields[name]) is not typ:
                raise TypeError(f"meta.{name} is {fields[name]!r}")
        # No "settings" key: written before they were recorded (same format, still loads).
        meta = CheckpointMeta(**{name: fields[name] for name in META_TYPES},
                              settings=fields.get("settings"))
        files = data["files"]
        for name, entry in files.items():
            if "/" in name or name.startswith(".") or type(entry["bytes"]) is not int \
                    or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
                raise ValueError(f"bad file entry {name!r}")
        if STATE_FILE not in files:
            raise ValueError(f"no {STATE_FILE} listed")
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{marker}: malformed ({type(exc).__name__}: {exc})") from None
    if meta.step != step:
        raise CheckpointError(f"{marker}: records step {meta.step}, not {step}")
    if check_sizes:
        for name, entry in files.items():
            check_size(path / name, entry["bytes"])
    return meta, files


def check_size(path: Path, expected: int) -> None:
    try:
        found = os.lstat(path)  # gradsync writes plain files only; a symlink is not one
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (listed in {MARKER})") from None
    if not stat.S_ISREG(found.st_mode):
        raise CheckpointError(f"{path}: not a plain file (a symlink or other; gradsync "
                              "never writes one into a checkpoint)")
    size = found.st_size
    if size != expected:
        what = "truncated" if size < expected else "wrong size"
        raise CheckpointError(f"{path}: {what}: {size} bytes, {MARKER} records {expected}")


def verify_file(path: Path, entry: dict[str, Any]) -> None:
    check_size(path, entry["bytes"])
    digest = sha256_of(path)
    if digest != entry["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch: sha256 {digest[:16]}..., "
                              f"{MARKER} records {entry['sha256'][:16]}...")


def read_file(path: Path, entry: dict[str, Any]) -> Any:
    verify_file(path, entry)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        # torch's text is a page of advice to load with weights_only=False; keep the cause.
        text = str(exc).split("WeightsUnpickler error:")[-1].strip().split("\n\n")[0]
        cause = " ".join(text.split()).split(". ")[0][:160]
        raise CheckpointError(f"{path}: cannot be unpickled with weights_only=True "
                              f"({type(exc).__name__}: {cause})") from exc


def check_loadable(obj: Any, where: str) -> None:
    """Raise TypeError naming the first object `torch.load(weights_only=True)` would refuse."""
    if isinstance(obj, torch.Tensor) or type(obj) in LEAVES:
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where} has a key of type {type(key).__name__}")
            check_loadable(value, f"{where}[{key!r}]")
    elif type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_loadable(value, f"{where}[{i}]")
    else:
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a "
                        "checkpoint holds only tensors, dicts, lists, tuples, str, int, "
                        "float, bool and None, so that it loads with weights_only=True")


class HashingWriter:
    """File wrapper that hashes what `torch.save` writes, so nothing is read back.

    An OSError of the file (a full disk) is kept: torch's zip writer reports a failed write
    only as "unexpected pos ...", so `write_fsynced` re-raises the real cause.
    """

    def __init__(self, file: Any):
        self.file, self.digest, self.size = file, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            written = self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.digest.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            self.error = exc
            raise


def write_fsynced(path: Path, obj: Any) -> dict[str, Any]:
    """Write `obj` with torch.save, flush and fsync it; return its sha256 and size.

    Raises:
        OSError: the file system refused (ENOSPC for a full disk), whatever torch made of it.
    """
    with os.fdopen(open_new(path), "wb") as f:
        writer = HashingWriter(f)
        try:
            torch.save(obj, writer)
        except Exception as exc:
            if writer.error is not None:
                raise writer.error from exc
            raise
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": writer.digest.hexdigest(), "bytes": writer.size}


def describe_os_error(exc: OSError, directory: Path) -> str:
    """One line for a failed checkpoint write; a full disk is named as such."""
    if exc.errno == errno.ENOSPC:
        return f"no space left on device while writing a checkpoint into {directory}"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing a checkpoint into {directory}"
    return f"cannot write a checkpoint into {directory}: {exc.strerror or exc}"


def open_new(path: Path) -> int:
    """Create ``path`` afresh for writing and return its descriptor, never through a symlink.

    A leftover of an interrupted save, or a symlink planted in its place, is unlinked first
    (which removes the link, not its target); ``O_EXCL`` then fails if anything reappeared
    in between, instead of writing through it.

    Raises:
        CheckpointError: something reappeared at ``path`` while it was being replaced.
        OSError: the file system refused.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    try:
        return os.open(path, OPEN_NEW, 0o644)
    except FileExistsError:
        raise CheckpointError(f"{path}: reappeared while it was being replaced; another "
                              f"process is writing into {path.parent}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    """Remove a file or directory; a marker goes first so a half-removed one never counts."""
    if path.is_dir() and not path.is_symlink():
        if (path / MARKER).exists():
            (path / MARKER).unlink()
            fsync_dir(path)
        shutil.rmtree(path)
    else:
        path.unlink()
