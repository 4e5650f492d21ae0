"""theta0 references to a base model on the Hub, pinned to a commit and a tensor hash.

Why pin: a branch moves, and an ``.mcnc`` file must always rebuild the weights it was made
with. The reference names the commit the branch points to now, and the sha256 of each
tensor's bytes, which the reader checks before use (R74, R75).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from huggingface_hub import constants

from ..errors import ExternalReferenceError, HubOfflineError
from ..uri import parse_uri
from .download import download, pinned

if TYPE_CHECKING:
    from ..writer import Theta0

__all__ = ["theta0_reference", "theta0_references"]


def theta0_reference(reference: str, tensor: str, *, token: str | None = None,
                     endpoint: str | None = None) -> Theta0:
    """``Theta0.external`` for tensor ``tensor`` of ``[hf://]ORG/REPO[@REVISION]/FILE``
    (a safetensors file), with the revision resolved to its current commit."""
    return theta0_references(reference, [tensor], token=token, endpoint=endpoint)[tensor]


def theta0_references(reference: str, tensors: Iterable[str], *, token: str | None = None,
                      endpoint: str | None = None) -> dict[str, Theta0]:
    """``theta0_reference`` for many tensors of one file: one commit lookup, one download."""
    # torch only here: ``mcnc push`` and ``mcnc pull`` import this package without it
    from safetensors import SafetensorError, safe_open

    from ..reader import tensor_sha256
    from ..writer import Theta0

    target = parse_uri(reference, error=ExternalReferenceError)
    if constants.HF_HUB_OFFLINE and not target.pinned:  # a cached ref may be out of date
        raise HubOfflineError(
            f"{target}: pinning a theta0 reference reads the commit the branch points to now, "
            "but offline mode is on (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE, or give the "
            "commit hash (ORG/REPO@<commit>/FILE)")
    target = pinned(target, token, endpoint)
    local = download(target, token=token, endpoint=endpoint)
    out: dict[str, Theta0] = {}
    try:
        with safe_open(str(local), framework="pt") as base:
            names = set(base.keys())
            for name in tensors:
                if name not in names:
                    raise ExternalReferenceError(
                        f"{target}: no tensor named {name!r}; the file holds {len(names)} "
                        f"tensors, e.g. {sorted(names)[:3]}")
                out[name] = Theta0.external(str(target), name, tensor_sha256(base.get_tensor(name)))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ExternalReferenceError(f"{target}: not a readable safetensors file ({local}): "
                                     f"{exc}") from exc
    return out
