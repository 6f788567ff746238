"""What `gradsync serve` serves: each ``--model`` (and ``--checkpoint-dir``) parsed once into a
:class:`ModelSource`, which the front resolves to a committed step and each replica loads.

    --model model.pt2                    a torch.export program, named after the file
    --model gpt=lm.pt2                   ... named "gpt"
    --model pkg.models:build             pkg.models.build() filled from --checkpoint-dir
    --model mnist=pkg.models:build@DIR   ... from DIR's newest committed checkpoint
    --checkpoint-dir DIR                 alone (or beside programs): the built-in workload
                                         that `gradsync train` checkpointed in DIR

A source crosses to a replica as JSON on its command line (names, paths, numbers only).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .model import Checkpoint, ServeError, find_checkpoint

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class ModelSource:
    """One served model.

    Attributes:
        kind: "workload" (a `gradsync train` checkpoint), "program" (a .pt2) or "factory".
        name: its name at ``/v2/models/{name}``.
        path: the program, or the checkpoint directory (workload, factory).
        factory: "package.module:function" (kind "factory").
        step: the checkpoint's step, once resolved (its version; a program's is 1).
        input_shape, input_datatype: a factory model's input row, when its module has no
            ``example_input``.
        source: the --checkpoint-dir a private copy of ``path`` was taken from.
    """

    kind: str
    name: str
    path: str
    factory: str = ""
    step: int = 1
    input_shape: tuple[int, ...] = ()
    input_datatype: str | None = None
    source: str | None = None

    @property
    def version(self) -> str:
        return str(self.step)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(Path(self.path), self.step, self.name,
                          Path(self.source) if self.source else None)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelSource:
        fields = json.loads(text)
        return cls(**{**fields, "input_shape": tuple(fields["input_shape"])})


def parse_model(value: str, checkpoint_dir: str | None, input_shape: tuple[int, ...],
                input_datatype: str | None) -> ModelSource:
    """One ``--model`` value (``[NAME=]FILE.pt2`` or ``[NAME=]module:function[@DIR]``).

    Raises:
        ServeError: the value is neither form, or a factory has no checkpoint directory.
    """
    name, sep, rest = value.partition("=")
    if not sep:
        name, rest = "", value
    elif not _NAME.fullmatch(name):
        raise ServeError(f"--model {value}: the name {name!r} must be letters, digits, "
                         "'_', '.' or '-' (at most 64)")
    if rest.endswith(".pt2") or Path(rest).is_file():
        if not Path(rest).is_file():
            raise ServeError(f"--model {value}: no such file {rest}")
        return ModelSource("program", name or _clean(Path(rest).stem), rest)
    factory, _, directory = rest.partition("@")
    if not _FACTORY.fullmatch(factory):
        raise ServeError(f"--model {value}: expected FILE.pt2 (torch.export.save) or "
                         "package.module:function[@CHECKPOINT_DIR], optionally NAME= first")
    directory = directory or checkpoint_dir or ""
    if not directory:
        raise ServeError(f"--model {value}: a factory's weights come from a checkpoint: "
                         f"--model {factory}@DIR or --checkpoint-dir DIR")
    return ModelSource("factory", name or factory.rsplit(":", 1)[1], directory, factory,
                       input_shape=input_shape, input_datatype=input_datatype)


def _clean(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", stem)[:64] or "model"


def model_sources(models: tuple[str, ...], checkpoint_dir: str | None,
                  input_shape: tuple[int, ...], input_datatype: str | None
                  ) -> list[ModelSource]:
    """Every model to serve, checkpoints resolved to their newest committed step.

    Raises:
        ServeError: nothing to serve, a bad --model, two models of one name, or a
            checkpoint directory with nothing committed.
    """
    sources = [parse_model(m, checkpoint_dir, input_shape, input_datatype) for m in models]
    used = any(s.kind == "factory" and s.path == checkpoint_dir for s in sources)
    if checkpoint_dir and not used:
        sources.append(ModelSource("workload", "", checkpoint_dir))
    if not sources:
        raise ServeError("nothing to serve: give --model (a .pt2 program, or "
                         "module:function with a checkpoint) or --checkpoint-dir")
    resolved = []
    for source in sources:
        if source.kind != "program":
            found = find_checkpoint(source.path)
            source = replace(source, step=found.step, name=source.name or found.workload)
        resolved.append(source)
    names = [s.name for s in resolved]
    for name in names:
        if names.count(name) > 1:
            raise ServeError(f"two models are named {name!r}: name them, "
                             "--model NAME=...")
    return resolved


def load_source(source: ModelSource):
    """The model of ``source`` as a replica runs it (a :class:`model.Served`).

    Raises:
        ServeError: it does not load (one line naming why).
    """
    from .export import load_factory, load_program
    from .model import served_workload

    if source.kind == "program":
        return load_program(source.path)
    if source.kind == "factory":
        return load_factory(source.factory, source.checkpoint(), source.input_shape,
                            source.input_datatype)
    return served_workload(source.checkpoint())
