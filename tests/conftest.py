"""pytest-timeout's per-test limits follow GRADSYNC_TEST_TIMEOUT_SCALE, like every other
timeout in the tests (tests/distributed.py reads it); tests marked ``netns`` skip where
network namespaces cannot be built."""

from __future__ import annotations

import os

import pytest

from tests.distributed import TIMEOUT_SCALE, scaled
from tests.helpers import netns_unavailable


def _default_timeout(config: pytest.Config) -> float | None:
    """pytest-timeout's own precedence for a test without a marker: --timeout, then
    PYTEST_TIMEOUT, then the ini file (pyproject.toml)."""
    for value in (config.getoption("timeout", None), os.environ.get("PYTEST_TIMEOUT"),
                  config.getini("timeout")):
        if value not in (None, ""):
            return float(value)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if TIMEOUT_SCALE == 1:
        return
    default = _default_timeout(config)
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is None:
            if default:
                item.add_marker(pytest.mark.timeout(scaled(default)))
            continue
        kwargs = dict(marker.kwargs)
        args = list(marker.args)
        if "timeout" in kwargs:
            kwargs["timeout"] = scaled(kwargs["timeout"])
        elif args:
            args[0] = scaled(args[0])
        # Prepended, so that get_closest_marker (pytest-timeout's lookup) finds this one.
        item.add_marker(pytest.mark.timeout(*args, **kwargs), append=False)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("netns") is not None:
        reason = netns_unavailable()
        if reason:
            pytest.skip(reason)
