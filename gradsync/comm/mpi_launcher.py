"""What an MPI launcher tells a process, read without mpi4py, and the start-up check that
every rank it started chose the same engine.

mpiexec (MPICH's hydra) and srun set PMI_RANK / PMI_SIZE, Open MPI's mpirun
OMPI_COMM_WORLD_RANK / _SIZE. Everything here but :func:`check_engines_agree` reads only
those, so the CLI and the engine table (engines.py) recognise a launcher without importing
mpi4py; mpi.py, the engine itself, imports mpi4py through :func:`import_mpi`.
"""

from __future__ import annotations

import os
import sys

import torch

MISSING = "MPI engine needs mpi4py and an MPI: pip install 'gradsync[mpi]'"


def import_mpi():
    """The mpi4py.MPI module (importing it initialises MPI).

    Raises:
        RuntimeError: no mpi4py, or no MPI library for it to load.
    """
    try:
        from mpi4py import MPI
    except ImportError as exc:  # also an mpi4py that finds no libmpi to load
        raise RuntimeError(MISSING) from exc
    return MPI


def finalize_mpi() -> bool:
    """Finalize MPI if this process initialised it (imported mpi4py) and has not finalized
    it yet. Ranks end with ``os._exit`` (cli.py), which skips mpi4py's own finalize at exit;
    without one MPICH leaves its shared-memory segment (``/dev/shm/mpich_shm_*``, 2 MB) behind
    on every run.

    MPI_Finalize may wait for the other ranks (MPICH's shared memory is let go once every
    rank of the host has finalized): call it only on a rank that ended well, and bound it
    (the CLI does, with a timer) in case a peer never comes.

    Returns:
        Whether MPI was finalized here.
    """
    MPI = sys.modules.get("mpi4py.MPI")  # never import it here: that would initialise MPI
    if MPI is None or not MPI.Is_initialized() or MPI.Is_finalized():
        return False
    MPI.Finalize()
    return True


def mpi_environment() -> bool:
    """Whether this process was started by an MPI launcher (MPICH/hydra's PMI_RANK and
    PMI_SIZE, Open MPI's OMPI_COMM_WORLD_RANK), checked without importing mpi4py."""
    env = os.environ
    return ("PMI_RANK" in env and "PMI_SIZE" in env) or "OMPI_COMM_WORLD_RANK" in env


def adopt_mpi_launcher() -> bool:
    """Under mpiexec/srun (an MPI environment, and no torchrun's RANK and WORLD_SIZE) each
    process is a rank: set RANK and WORLD_SIZE from the MPI launcher's variables, and
    GRADSYNC_ENGINE=mpi unless it is set. Call before anything reads them (the CLI does, first).

    Returns:
        Whether the environment was adopted.
    """
    env = os.environ
    if ("RANK" in env and "WORLD_SIZE" in env) or not mpi_environment():
        return False
    rank = env.get("PMI_RANK", env.get("OMPI_COMM_WORLD_RANK"))
    size = env.get("PMI_SIZE", env.get("OMPI_COMM_WORLD_SIZE"))
    if rank is None or size is None:
        return False
    env.update(RANK=rank, WORLD_SIZE=size)
    env.setdefault("GRADSYNC_ENGINE", "mpi")
    return True


def check_engines_agree(chosen: str, names: tuple[str, ...]) -> None:
    """Under an MPI launcher every rank reaches MPI_COMM_WORLD whatever engine it chose:
    compare the choices there (as positions in ``names``, the engine table's), so that ranks
    mixing engines fail at start-up naming the ranks instead of waiting for each other until
    the timeout. Silent without mpi4py.

    Raises:
        RuntimeError: the ranks did not all choose ``chosen``.
    """
    try:
        MPI = import_mpi()
    except RuntimeError:
        return
    comm = MPI.COMM_WORLD
    codes = torch.zeros(comm.Get_size(), dtype=torch.int64)
    comm.Allgather(torch.tensor([names.index(chosen)]).numpy(), codes.numpy())
    if len(set(codes.tolist())) > 1:
        by_engine = {name: [r for r, c in enumerate(codes.tolist()) if c == i]
                     for i, name in enumerate(names)}
        said = " and ".join(f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))} "
                            f"chose {name}" for name, ranks in by_engine.items() if ranks)
        raise RuntimeError(f"the ranks mix engines: {said}; give every rank the same "
                           "--engine / GRADSYNC_ENGINE")
