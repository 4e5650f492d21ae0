"""Pytest fixture ``hub``: a started ``HubServer`` with the real client pointed at it.

Why a separate module: other test files import it (``from hub_fixtures import hub``) or a
conftest re-exports it, without making ``tests/`` a package.

Why so much patching: ``huggingface_hub`` snapshots its environment (endpoint, cache paths,
offline flag, token path) into ``huggingface_hub.constants`` at import time, and keeps one global
HTTP client plus one global ``HfApi`` instance. See ``hub_server``'s module docstring.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
from hub_server import HubServer
from huggingface_hub import constants
from huggingface_hub import hf_api as hf_api_module

# Environment variables that could leak a real token, offline mode or an OIDC exchange into tests.
_CLEARED_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_OIDC_RESOURCE",
    "HF_OIDC_ID_TOKEN",
)


def configure_hf_client(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    """Point ``huggingface_hub`` at ``endpoint`` with an isolated HF_HOME under ``home``.

    Everything goes through ``monkeypatch`` so it is undone after the test.
    """
    cache = home / "hub"
    paths = {
        "HF_HOME": home,
        "HF_HUB_CACHE": cache,
        "HUGGINGFACE_HUB_CACHE": cache,
        "HF_ASSETS_CACHE": home / "assets",
        "HUGGINGFACE_ASSETS_CACHE": home / "assets",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
    }
    for name in _CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, path in paths.items():
        monkeypatch.setenv(name, str(path))
        monkeypatch.setattr(constants, name, str(path), raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("NO_PROXY", _no_proxy_value())
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(hf_api_module.api, "endpoint", endpoint)
    _patch_imported_cache_constant(monkeypatch, str(cache))
    # The shared client is built lazily from the environment (proxies included): rebuild it.
    huggingface_hub.close_session()


def _no_proxy_value() -> str:
    """Keep any configured proxy away from 127.0.0.1."""
    current = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    return ",".join(filter(None, [current, "127.0.0.1", "localhost"]))


def _patch_imported_cache_constant(monkeypatch: pytest.MonkeyPatch, cache: str) -> None:
    """``scan_cache_dir`` uses a copy of HF_HUB_CACHE imported by name."""
    from huggingface_hub.utils import _cache_manager

    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", cache)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A started fake Hub; the client uses it, a temp cache, no token and online mode."""
    server = HubServer().start()
    try:
        configure_hf_client(monkeypatch, server.endpoint, tmp_path / "hf_home")
        yield server
    finally:
        huggingface_hub.close_session()
        server.stop()
    assert not server.errors, f"the test hub itself failed: {server.errors!r}"
