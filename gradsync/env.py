"""The GRADSYNC_* environment variables: read and validated in one place, as flags are.

Each reader returns the variable's value (or its default when unset or empty) and raises a
ValueError that names the variable, its value and what it must be, e.g. ``GRADSYNC_TIMEOUT=abc:
must be a positive number of seconds``; the CLI prints that as one line and exits 2 before
anything starts (:func:`validate`). No torch import: the CLI reads them first.

GRADSYNC_TEST_TIMEOUT_SCALE belongs to the tests; the launcher's own variables
(GRADSYNC_ELASTIC_STORE, GRADSYNC_ELASTIC_UID, GRADSYNC_LAUNCHED, GRADSYNC_LAB*) are set by
gradsync, not by users.
"""

from __future__ import annotations

import os

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ROLES = ("server", "worker")
# Beyond a week a timeout is a typo, and it overflows the engine's timedelta (as --timeout).
SECONDS_MAX = 7 * 24 * 3600.0
_TRUE, _FALSE = ("1", "true"), ("0", "false")


def _raw(name: str) -> str | None:
    """The variable's text, or None when it is unset or empty (both mean "the default")."""
    value = os.environ.get(name)
    return None if value is None or value.strip() == "" else value


def _bad(name: str, value: str, must: str) -> ValueError:
    return ValueError(f"{name}={value}: must be {must}")


def seconds(name: str, default: float) -> float:
    """A positive number of seconds (at most a week) from variable ``name``.

    Raises:
        ValueError: not a number, or not in (0, a week].
    """
    value = _raw(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise _bad(name, value, "a positive number of seconds") from None
    if not number > 0:  # (also true for NaN)
        raise _bad(name, value, "a positive number of seconds")
    if number > SECONDS_MAX:
        raise _bad(name, value, f"a positive number of seconds, at most {SECONDS_MAX:g}")
    return number


def cache_dir() -> str:
    """GRADSYNC_CACHE (default $XDG_CACHE_HOME/gradsync, else ~/.cache/gradsync): where
    gradsync keeps what it can compute again (the digits arrays, the planner's figures of
    this machine)."""
    return _raw("GRADSYNC_CACHE") or os.path.join(
        _raw("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gradsync")


def timeout_s(default: float) -> float:
    """GRADSYNC_TIMEOUT: seconds any blocking communication may wait."""
    return seconds("GRADSYNC_TIMEOUT", default)


def heartbeat_s(default: float = 1.0) -> float:
    """GRADSYNC_HEARTBEAT_S: seconds between a rank's heartbeats."""
    return seconds("GRADSYNC_HEARTBEAT_S", default)


def elastic_lost_s(default: float = 3.0) -> float:
    """GRADSYNC_ELASTIC_LOST_S: after how many seconds without a heartbeat an elastic worker
    is declared lost (default 3, or 5 heartbeat periods if longer).

    Raises:
        ValueError: not a positive number of seconds, or less than two heartbeat periods.
    """
    beat = heartbeat_s(0.5)  # an elastic worker's period (comm/elastic.py)
    value = seconds("GRADSYNC_ELASTIC_LOST_S", max(default, 5 * beat))
    if value < 2 * beat:
        raise _bad("GRADSYNC_ELASTIC_LOST_S", os.environ["GRADSYNC_ELASTIC_LOST_S"],
                   f"at least two heartbeat periods (GRADSYNC_HEARTBEAT_S={beat:g}): "
                   f"{2 * beat:g} or more")
    return value


def stall_s(default: float) -> float:
    """GRADSYNC_STALL_S: after how long a waiting collective is reported."""
    return seconds("GRADSYNC_STALL_S", default)


def _flag(name: str, value: str | None, default: bool) -> bool:
    """A yes/no variable's value: 0, 1, false or true (any case), ``default`` when unset."""
    if value is None or value.strip() == "":
        return default
    if value.lower() not in _TRUE + _FALSE:
        raise _bad(name, value, "0 or 1 (or false, true)")
    return value.lower() in _TRUE


def check() -> bool:
    """GRADSYNC_CHECK: whether every collective is verified across ranks (default off).

    Raises:
        ValueError: not 0, 1, false or true.
    """
    return _flag("GRADSYNC_CHECK", _raw("GRADSYNC_CHECK"), False)


def zygote(environ: dict[str, str] | None = None) -> bool:
    """GRADSYNC_ZYGOTE (in ``environ``, default this process's): whether the launcher forks
    its ranks from one process that imported torch (default on; launcher/zygote.py).

    Raises:
        ValueError: not 0, 1, false or true.
    """
    return _flag("GRADSYNC_ZYGOTE", (os.environ if environ is None else environ).get(
        "GRADSYNC_ZYGOTE"), True)


def log_level() -> str:
    """GRADSYNC_LOG: the level of gradsync's log, upper case (default WARNING).

    Raises:
        ValueError: not a logging level's name.
    """
    value = _raw("GRADSYNC_LOG")
    if value is None:
        return "WARNING"
    if value.upper() not in LOG_LEVELS:
        raise _bad("GRADSYNC_LOG", value, f"a log level: {', '.join(LOG_LEVELS)}")
    return value.upper()


def role() -> str | None:
    """GRADSYNC_ROLE: "server" or "worker", this rank's part in a PS run; None when unset.

    Raises:
        ValueError: neither.
    """
    value = _raw("GRADSYNC_ROLE")
    if value is not None and value not in ROLES:
        raise _bad("GRADSYNC_ROLE", value, " or ".join(ROLES))
    return value


def engine(names: tuple[str, ...]) -> str:
    """GRADSYNC_ENGINE, one of ``names`` (the engine table's, with "auto"); "auto" when unset.

    Raises:
        ValueError: not one of ``names``.
    """
    value = _raw("GRADSYNC_ENGINE")
    if value is None:
        return "auto"
    if value not in names:
        raise _bad("GRADSYNC_ENGINE", value, f"one of {', '.join(names)}")
    return value


def validate(engines: tuple[str, ...]) -> None:
    """Read every variable once, so that a bad one stops the command before it starts.

    Args:
        engines: the names GRADSYNC_ENGINE may take.
    Raises:
        ValueError: the first bad variable, named.
    """
    log_level()
    timeout = timeout_s(300.0)
    heartbeat_s()
    elastic_lost_s()
    stall_s(timeout / 4)
    check()
    zygote()
    role()
    engine(engines)
