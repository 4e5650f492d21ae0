"""``save_pretrained`` and ``push_to_hub`` for a transformers model trained in the manifold.

The folder is what ``from_pretrained`` reads and what transformers itself expects around the
weights: ``config.json`` (its ``architectures`` names the plain class), ``generation_config.json``
when the model generates, the tokenizer's files when one is given, ``model.mcnc`` (written by
``mcnc_format.torch.save_model``) and a model card whose example loads the folder.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ..atomic import atomic_files
from ..errors import HubError, MCNCError, WriteError
from ..reader import MCNCFile
from ..torch import save_model
from .loading import CONFIG_FILE, MODEL_FILE

__all__ = ["CARD_FILE", "push_to_hub", "save_pretrained"]

CARD_FILE = "README.md"


#: Weight files transformers' own ``from_pretrained`` would read before anything else.
DENSE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike[str],
                    tokenizer: Any = None, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` (reparametrized with ``mcnc_format.torch.reparametrize`` or given
    MCNC-LoRA adapters) to the folder ``save_directory``; returns the folder.

    Files of the same names are replaced, as transformers' ``save_pretrained`` does, all of
    them or none: every file is written to a temporary folder first and moved into place
    only once all were written, so a failure (a full disk) raises ``WriteError`` and leaves
    the folder as it was. A README.md already there is kept as the card's text, with the
    mcnc-format section updated.
    Raises ``ReparametrizeError`` for a model that is not reparametrized, ``MCNCError`` for
    one without a transformers ``config``, and ``WriteError`` for a folder holding dense
    weights of an earlier plain save (``DENSE_WEIGHT_FILES``), which transformers would load
    instead.
    """
    from ..model_card import FileFacts, TransformersUsage, render_card

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise MCNCError(f"{type(model).__name__} has no transformers config; save it with "
                        "mcnc_format.torch.save_model instead")
    folder = Path(save_directory)
    stale = [name for name in DENSE_WEIGHT_FILES if (folder / name).exists()]
    if stale:
        raise WriteError(f"{folder}: holds {stale} from an earlier save; plain transformers "
                         "would load those weights instead of model.mcnc. Remove them, or "
                         "save into another folder")
    card = folder / CARD_FILE
    existing = card.read_text(encoding="utf-8") if card.is_file() else None
    with atomic_files(folder) as staging:  # every file, or none, is replaced
        save_model(model, staging / MODEL_FILE, metadata=metadata)
        config = copy.deepcopy(config)
        config.architectures = [parametrize.type_before_parametrizations(model).__name__]
        config.save_pretrained(staging)
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            generation.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        with MCNCFile(staging / MODEL_FILE) as mcnc_file:
            facts = [FileFacts.of(MODEL_FILE, mcnc_file)]
        paths = {p.name for p in folder.iterdir()} | {p.name for p in staging.iterdir()}
        usage = TransformersUsage.detect(paths, staging / CONFIG_FILE)
        (staging / CARD_FILE).write_text(
            render_card(existing, f"local/{folder.resolve().name}", facts, transformers=usage,
                        local_folder=str(folder)), encoding="utf-8")
    return folder


def push_to_hub(model: nn.Module, repo_id: str, *, tokenizer: Any = None,
                revision: str | None = None, private: bool = False,
                commit_message: str | None = None, base_model: str | None = None,
                tags: Iterable[str] = (), metadata: Mapping[str, str] | None = None,
                token: str | None = None, endpoint: str | None = None) -> Any:
    """``save_pretrained`` into a temporary folder, then ``mcnc_format.hub.push`` of it to
    ``repo_id`` in one commit (created if missing), the card's example naming the repo.
    Returns the ``PushResult`` (``.commit``, ``.uris``). A repository holding dense weights
    (``DENSE_WEIGHT_FILES``) is refused with ``HubError`` before anything is saved, as
    ``save_pretrained`` refuses such a folder: plain transformers would load those."""
    from ..hub import push, repo_files

    stale = sorted(set(DENSE_WEIGHT_FILES) & repo_files(repo_id, revision, token=token,
                                                        endpoint=endpoint))
    if stale:
        raise HubError(f"push to {repo_id}: the repository holds {stale} from an earlier push; "
                       "plain transformers would load those weights instead of model.mcnc "
                       "(with this config). Delete them from the repository, or push to another "
                       "repository")
    with tempfile.TemporaryDirectory(prefix="mcnc-push-") as tmp:
        folder = save_pretrained(model, Path(tmp) / repo_id.rsplit("/", 1)[-1], tokenizer,
                                 metadata=metadata)
        return push(folder, repo_id, revision, private, commit_message=commit_message,
                    base_model=base_model, tags=tags, token=token, endpoint=endpoint)
