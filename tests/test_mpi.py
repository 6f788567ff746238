"""The MPI engine (gradsync/comm/mpi.py): gradsync's collectives, own all-reduce algorithms
and DataParallel under ``mpiexec``; skipped where mpi4py or an mpiexec beside this Python
is missing (``pip install 'gradsync[mpi]'`` brings both)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import scaled

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "mpi_collectives.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.fixture(autouse=True)
def _no_mpich_leftovers():
    """MPICH leaves its /dev/shm segment behind when mpiexec kills a job (a rank died or
    aborted): remove the ones this test's jobs made."""
    before = set(Path("/dev/shm").glob("mpich_shm_*"))
    yield
    for path in set(Path("/dev/shm").glob("mpich_shm_*")) - before:
        path.unlink(missing_ok=True)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "RANK", "WORLD_SIZE", "MASTER_"))}
    # One thread per rank: three ranks share two cores in CI.
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def _results(stdout: str) -> list[dict]:
    """Every ``RESULT {json}`` in the launcher's output, wherever a line break fell."""
    decoder, found, at = json.JSONDecoder(), [], stdout.find("RESULT ")
    while at >= 0:
        value, end = decoder.raw_decode(stdout, at + len("RESULT "))
        found.append(value)
        at = stdout.find("RESULT ", end)
    return found


@pytest.mark.timeout(90)
@pytest.mark.parametrize("ranks", [2, 3])
def test_collectives_and_training_under_mpiexec(ranks):
    pytest.importorskip("mpi4py")
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    proc = subprocess.run([str(MPIEXEC), "-n", str(ranks), sys.executable, str(SCRIPT)],
                          capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=scaled(80))
    results = _results(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(r["rank"] for r in results) == list(range(ranks)), proc.stdout[-3000:]
    failures = [f"rank {r['rank']}: {f}" for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures[:20])


@pytest.mark.timeout(60)
def test_launcher_is_recognised_without_importing_mpi4py():
    # Importing the engine must not need mpi4py; the launcher's variables are enough.
    code = ("import sys; from gradsync.comm.mpi import mpi_environment, MPI_ENGINE; "
            "assert 'mpi4py' not in sys.modules; "
            "print(mpi_environment(), MPI_ENGINE.is_initialized())")
    for extra, want in (({}, "False False"), ({"PMI_RANK": "0", "PMI_SIZE": "2"}, "True True"),
                        ({"OMPI_COMM_WORLD_RANK": "1"}, "True True")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=_env(**extra), cwd=ROOT, timeout=scaled(50))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == want.split(), (extra, out.stdout)


def test_engine_table_lists_names_and_chooses_from_the_environment(monkeypatch):
    from gradsync import comm
    from gradsync.comm.engines import get_engine
    from gradsync.comm.mpi import MPI_ENGINE

    assert comm.ENGINES == ("auto", *comm.ENGINE_REGISTRY) and comm.ENGINES[0] == "auto"
    assert {"torch", "mpi"} <= set(comm.ENGINE_REGISTRY)
    for name in comm.ENGINES:
        assert comm.check_engine(name) == name
    with pytest.raises(ValueError, match="unknown engine 'nccl'; choose one of auto, torch, mpi"):
        comm.check_engine("nccl")
    assert get_engine("mpi") is MPI_ENGINE
    for var in ("GRADSYNC_ENGINE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK",
                "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"):
        # setenv first, so that monkeypatch restores the variable's absence afterwards:
        # adopt_mpi_launcher below sets RANK and WORLD_SIZE in this process, and a later
        # test would otherwise believe it runs under a launcher.
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    assert comm.choose_engine() == "torch"
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    assert comm.choose_engine() == "mpi"              # auto under mpiexec
    assert comm.choose_engine("torch") == "torch"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")    # torchrun under srun: torch
    assert comm.choose_engine() == "torch"
    monkeypatch.setenv("GRADSYNC_ENGINE", "gloo")
    with pytest.raises(RuntimeError, match="GRADSYNC_ENGINE=gloo: must be one of auto, "):
        comm.choose_engine()
    monkeypatch.delenv("GRADSYNC_ENGINE")
    assert comm.adopt_mpi_launcher()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["GRADSYNC_ENGINE"]) \
        == ("1", "2", "mpi")
    assert not comm.adopt_mpi_launcher()              # RANK and WORLD_SIZE are set now


@pytest.mark.timeout(60)
def test_missing_mpi4py_gives_one_clear_error():
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from gradsync.comm.mpi import MPI_ENGINE, MISSING\n"
            "try:\n    MPI_ENGINE.world()\nexcept RuntimeError as e:\n"
            "    assert str(e) == MISSING, e; print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=scaled(50))
    assert out.stdout.strip() == "ok", out.stdout + out.stderr


@pytest.mark.timeout(60)
def test_ranks_mixing_engines_are_named_at_start_up():
    pytest.importorskip("mpi4py")
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    train = [sys.executable, "-m", "gradsync", "train", "--epochs", "1", "--out", "unused"]
    proc = subprocess.run([str(MPIEXEC), "-n", "1", "-env", "GRADSYNC_ENGINE", "torch", *train,
                           ":", "-n", "2", "-env", "GRADSYNC_ENGINE", "mpi", *train],
                          capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=scaled(50))
    assert proc.returncode != 0
    assert ("the ranks mix engines: rank 0 chose torch and ranks 1, 2 chose mpi"
            in proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _train(tmp_path, name: str, *flags: str, ranks: int | None = None, env=None):
    """`gradsync train` under mpiexec (``ranks``) or the local launcher (gloo); returns
    summary.json."""
    out = tmp_path / name
    argv = [sys.executable, "-m", "gradsync", "train", "--out", str(out), *flags]
    if ranks is not None:
        argv = [str(MPIEXEC), "-n", str(ranks), *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env(**(env or {})),
                          cwd=ROOT, timeout=scaled(80))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.timeout(200)
def test_ps_checkpoints_and_check_mode_under_mpiexec(tmp_path):
    """The PS on MPI gives the parameters it gives on gloo, bit for bit; an all-reduce run
    checkpointed and resumed under mpiexec, in check mode, ends where an uninterrupted one
    does."""
    pytest.importorskip("mpi4py")
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    ps = ("--arch", "ps", "--servers", "1", "--epochs", "1")
    on_mpi = _train(tmp_path, "ps-mpi", *ps, ranks=3)
    on_gloo = _train(tmp_path, "ps-gloo", *ps, "--workers", "2")
    assert on_mpi["workers"] == on_gloo["workers"] == 2
    assert on_mpi["parameters_sha1"] == on_gloo["parameters_sha1"]

    ck, check = str(tmp_path / "ck"), {"GRADSYNC_CHECK": "1"}
    _train(tmp_path, "first", "--epochs", "1", "--checkpoint-dir", ck, ranks=2, env=check)
    resumed = _train(tmp_path, "resumed", "--epochs", "2", "--checkpoint-dir", ck, "--resume",
                     ranks=2, env=check)
    whole = _train(tmp_path, "whole", "--epochs", "2", ranks=2)
    assert resumed["parameters_sha1"] == whole["parameters_sha1"]


@pytest.mark.timeout(60)
def test_a_dead_rank_ends_the_mpi_job_without_leftovers():
    """MPICH's mpiexec answers a rank's death by SIGKILLing every other rank at once (the
    survivors cannot speak, so hydra's own banner names the dead PID); what gradsync must
    give is a non-zero exit, soon, and no process left behind."""
    pytest.importorskip("mpi4py")
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    script = ROOT / "tests" / "scripts" / "mpi_dead_rank.py"
    proc = subprocess.run([str(MPIEXEC), "-n", "3", sys.executable, str(script)],
                          capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=scaled(50))
    assert proc.returncode != 0
    assert "Killed (signal 9)" in proc.stdout + proc.stderr
    left = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout


@pytest.mark.timeout(90)
def test_a_normal_run_under_mpiexec_leaves_nothing_in_dev_shm(tmp_path):
    """Each rank ends with os._exit (cli.py): it finalizes MPI first, else MPICH's 2 MB
    /dev/shm/mpich_shm_* segment stays behind after every run that went well."""
    pytest.importorskip("mpi4py")
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")
    before = set(Path("/dev/shm").iterdir())
    _train(tmp_path, "run", "--steps", "2", "--no-progress", ranks=2)
    left = sorted(str(p) for p in set(Path("/dev/shm").iterdir()) - before
                  if p.name.startswith("mpich"))
    assert left == [], left
