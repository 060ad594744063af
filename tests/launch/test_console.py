"""rlprims.launch.console: quiet_console silences the libraries' loggers (Liger's backend-import warnings
included) unless verbose, and leaves everything alone when verbose."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

from rlprims.launch.console import _QUIET_ENV, _QUIET_LOGGERS, quiet_console


@pytest.fixture
def restored():
    """Puts back what quiet_console changes: the environment defaults, logger levels, warning filters."""
    env = {key: os.environ.get(key) for key in _QUIET_ENV}
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    with warnings.catch_warnings():
        yield
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_quiet_console_silences_library_loggers(restored, caplog):
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    assert not quiet_console(verbose=True)  # verbose: nothing changes
    assert all(logging.getLogger(n).level == logging.NOTSET for n in _QUIET_LOGGERS)
    assert quiet_console(verbose=False)
    assert all(logging.getLogger(n).level == logging.ERROR for n in _QUIET_LOGGERS)
    registry = logging.getLogger("liger_kernel.backends.registry")  # where Liger warns per backend
    with caplog.at_level(logging.WARNING):
        registry.warning("Backend impl %r for op %r could not be imported", "x", "rope")
        registry.error("an error still shows")
    shown = [r.getMessage() for r in caplog.records if r.name.startswith("liger_kernel")]
    assert shown == ["an error still shows"]
