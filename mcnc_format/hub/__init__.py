"""Hugging Face Hub integration: publish and load ``.mcnc`` models and adapters.

Everything goes through ``huggingface_hub`` (``HfApi``, ``hf_hub_download``, its cache, token
handling, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``); this package adds the checks that make a
downloaded file safe to use, the model card, and errors that say what to do. See docs/hub.md.
"""

from ..uri import HubURI, parse_uri
from .download import pinned, pull, read_reference, resolve_path, resolve_reference
from .pin import theta0_reference, theta0_references
from .push import PushResult, push, repo_files
from .resolver import HubResolver

__all__ = [
    "HubResolver",
    "HubURI",
    "PushResult",
    "parse_uri",
    "pinned",
    "pull",
    "push",
    "read_reference",
    "repo_files",
    "resolve_path",
    "resolve_reference",
    "theta0_reference",
    "theta0_references",
]
