"""Shared pytest fixtures: the local Hub-protocol server for Hub tests, a digest cache of
each test's own (no test reads or writes the user's ``~/.cache``), and the hashes it records;
and gpu_marks.py's hook, which copies ``gpu_path`` marks into the junit report."""

from pathlib import Path

import pytest
from gpu_marks import pytest_collection_modifyitems  # noqa: F401  (the gpu_path hook)
from hub_fixtures import hub  # noqa: F401  (re-exported pytest fixture)

from mcnc_format.engine import digests
from mcnc_format.engine.digests import DigestCache


@pytest.fixture(autouse=True)
def _own_cache_directory(tmp_path_factory: pytest.TempPathFactory,
                         monkeypatch: pytest.MonkeyPatch) -> Path:
    """``XDG_CACHE_HOME`` of the test: the digest cache starts empty."""
    directory = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(directory))
    return directory


@pytest.fixture(autouse=True)
def _no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests hash bases they wrote a moment ago: the racy-entry rule (test_racy_digests.py)
    would keep every such hash out of the cache."""
    monkeypatch.setattr(digests, "racy_window_ns", lambda: 0, raising=False)


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names recorded in the digest cache: one per successful hash."""
    seen: list[str] = []
    real = DigestCache.remember

    def remember(self: DigestCache, identity: tuple, name: str, digest: str,
                 *args: object) -> None:
        seen.append(name)
        real(self, identity, name, digest, *args)

    monkeypatch.setattr(DigestCache, "remember", remember)
    return seen
