"""Shared pytest fixtures: the local Hub-protocol server for Hub tests, and a digest cache of
each test's own (no test reads or writes the user's ``~/.cache``)."""

from pathlib import Path

import pytest
from hub_fixtures import hub  # noqa: F401  (re-exported pytest fixture)


@pytest.fixture(autouse=True)
def _own_cache_directory(tmp_path_factory: pytest.TempPathFactory,
                         monkeypatch: pytest.MonkeyPatch) -> Path:
    """``XDG_CACHE_HOME`` of the test: the digest cache starts empty."""
    directory = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(directory))
    return directory
