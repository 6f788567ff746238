"""The one table of engines: name -> the engine, and how to tell its launcher started us.

Everything that lists or chooses engines derives from :data:`ENGINE_REGISTRY`: ``ENGINES``
(the CLI's ``--engine`` choices and every validation), ``auto``'s choice and the start-up
check that every rank chose alike. A new engine is one new module implementing
:class:`~gradsync.comm.engine.Engine` plus one line here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from .. import env
from .engine import TORCH, Engine
from .mpi import MPI_ENGINE, check_engines_agree, mpi_environment


@dataclass(frozen=True)
class EngineEntry:
    """One engine.

    Args:
        name: what users pass as ``--engine`` / ``GRADSYNC_ENGINE``.
        engine: the process's instance (its binding is imported only when used).
        launched: whether this process was started by a launcher that implies this engine;
            ``auto`` takes the first entry for which it holds, else the first entry.
    """

    name: str
    engine: Engine
    launched: Callable[[], bool]


def _torchrun() -> bool:
    # torchrun (and its elastic agent) may itself run under srun, whose MPI variables are set
    # too: its own variable wins.
    return "TORCHELASTIC_RUN_ID" in os.environ


ENGINE_REGISTRY: dict[str, EngineEntry] = {e.name: e for e in (
    EngineEntry("torch", TORCH, _torchrun),          # first: the default
    EngineEntry("mpi", MPI_ENGINE, mpi_environment),  # mpiexec / srun with PMI
)}

ENGINES: tuple[str, ...] = ("auto", *ENGINE_REGISTRY)


def check_engine(name: str) -> str:
    """Return ``name`` if it is an engine (or "auto"); else raise ValueError listing them."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    return name


def choose_engine(name: str | None = None) -> str:
    """The engine that ``name`` (default ``GRADSYNC_ENGINE``, else "auto") asks for, by its
    table name: "auto" is the first engine whose launcher started this process (MPI under
    mpiexec/srun's MPI environment, unless torchrun's own variable is set), else torch.

    Raises:
        ValueError: ``name`` is not an engine.
        RuntimeError: ``GRADSYNC_ENGINE`` is not an engine.
    """
    if name is None:
        try:
            name = env.engine(ENGINES)  # the one validation of GRADSYNC_* variables
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None
    check_engine(name)
    if name != "auto":
        return name
    return next((e.name for e in ENGINE_REGISTRY.values() if e.launched()),
                next(iter(ENGINE_REGISTRY)))


def get_engine(name: str) -> Engine:
    """The engine instance of table name ``name`` ("auto" first goes through
    :func:`choose_engine`).

    Raises:
        ValueError: ``name`` is not in the table.
    """
    entry = ENGINE_REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown engine {name!r}; choose one of "
                         f"{', '.join(ENGINE_REGISTRY)} (or auto, through choose_engine)")
    return entry.engine


def start_engine(name: str | None = None) -> Engine:
    """The engine to start this process's world with (:func:`choose_engine`). Under an MPI
    launcher every rank reaches MPI_COMM_WORLD whatever it chose, so the ranks first compare
    their choices there: ranks mixing engines fail at start-up, naming the ranks, instead of
    waiting for each other until the timeout.

    Raises:
        RuntimeError: the ranks chose different engines, or GRADSYNC_ENGINE is unknown.
    """
    chosen = choose_engine(name)
    if mpi_environment():
        check_engines_agree(chosen, tuple(ENGINE_REGISTRY))
    return get_engine(chosen)
