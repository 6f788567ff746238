"""The GRADSYNC_* environment variables get the validation flags get: a bad value stops
`gradsync train` before anything starts, in one line naming the variable and what it must
be, exit 2, no traceback (gradsync/env.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.distributed import scaled
from tests.helpers import ENV, REPO, in_process, one_line_error

# variable, bad value, what the line says it must be
BAD = [
    ("GRADSYNC_LOG", "bogus", "must be a log level: DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("GRADSYNC_TIMEOUT", "abc", "must be a positive number of seconds"),
    ("GRADSYNC_TIMEOUT", "-5", "must be a positive number of seconds"),
    ("GRADSYNC_TIMEOUT", "1e9", "must be a positive number of seconds, at most 604800"),
    ("GRADSYNC_CHECK", "maybe", "must be 0 or 1 (or false, true)"),
    ("GRADSYNC_HEARTBEAT_S", "0", "must be a positive number of seconds"),
    ("GRADSYNC_ELASTIC_LOST_S", "x", "must be a positive number of seconds"),
    ("GRADSYNC_ELASTIC_LOST_S", "0.5", "must be at least two heartbeat periods "
     "(GRADSYNC_HEARTBEAT_S=0.5): 1 or more"),
    ("GRADSYNC_STALL_S", "nan", "must be a positive number of seconds"),
    ("GRADSYNC_ENGINE", "gloo", "must be one of auto, torch, mpi"),
    ("GRADSYNC_ROLE", "boss", "must be server or worker"),
]


@pytest.fixture
def clean_env(monkeypatch):
    for name, _, _ in BAD:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,value,must", BAD, ids=[f"{n}={v}" for n, v, _ in BAD])
def test_a_bad_variable_is_one_line_and_exit_2(clean_env, capfd, name, value, must):
    clean_env.setenv(name, value)
    line = one_line_error(in_process(capfd, "train", "--epochs", "1", "--out", "unused"))
    assert line == f"gradsync: error: {name}={value}: {must}", line


@pytest.mark.timeout(60)
def test_a_bad_log_level_from_the_shell_prints_no_traceback(tmp_path):
    """As a user runs it: a fresh `gradsync train`, whose log is configured first of all."""
    run = subprocess.run([sys.executable, "-m", "gradsync", "train", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=scaled(50), cwd=REPO,
                         env={**ENV, "GRADSYNC_LOG": "bogus"})
    one_line_error(run, "GRADSYNC_LOG=bogus: must be a log level")
    assert not any(tmp_path.iterdir())  # nothing started


def test_readers_give_defaults_and_accept_good_values(clean_env):
    from gradsync import env

    assert (env.log_level(), env.timeout_s(300.0), env.check(), env.role(),
            env.engine(("auto", "torch"))) == ("WARNING", 300.0, False, None, "auto")
    for name, value in (("GRADSYNC_LOG", "info"), ("GRADSYNC_TIMEOUT", "2.5"),
                        ("GRADSYNC_CHECK", "true"), ("GRADSYNC_ROLE", "server"),
                        ("GRADSYNC_ENGINE", "torch"), ("GRADSYNC_STALL_S", "")):
        clean_env.setenv(name, value)
    assert (env.log_level(), env.timeout_s(300.0), env.check(), env.role(),
            env.engine(("auto", "torch")), env.stall_s(7.0)) \
        == ("INFO", 2.5, True, "server", "torch", 7.0)
    clean_env.setenv("GRADSYNC_CHECK", "0")
    assert env.check() is False
    env.validate(("auto", "torch"))


@pytest.mark.timeout(60)
def test_env_imports_no_torch():
    code = "import sys, gradsync.env; assert 'torch' not in sys.modules"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=scaled(50), cwd=REPO, env=ENV)
    assert run.returncode == 0, run.stderr


def test_the_library_names_the_variable_too(clean_env):
    """init_process_group reads GRADSYNC_TIMEOUT itself: a script run without the CLI gets
    the same sentence."""
    from gradsync.comm.group import _defaults

    clean_env.setenv("GRADSYNC_TIMEOUT", "abc")
    with pytest.raises(ValueError, match="^GRADSYNC_TIMEOUT=abc: must be a positive number "
                                         "of seconds$"):
        _defaults(None, None)
