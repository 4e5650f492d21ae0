"""PyTorch Lightning ``.ckpt`` files.

Layout (``lightning.pytorch.Trainer.save_checkpoint`` and ``ModelCheckpoint``): one
``torch.save`` zip archive of a dict::

    {"epoch": 2, "global_step": 30, "pytorch-lightning_version": "2.x",
     "state_dict": {...},                   the LightningModule's, names as on the module
     "optimizer_states": [...], "lr_schedulers": [...], "loops": {...}, "callbacks": {...},
     "hparams_name": ..., "hyper_parameters": AttributeDict(...)}

It is read with torch's weights-only unpickler (tensors and plain containers) memory-mapped,
plus one explicit stand-in: Lightning stores ``save_hyperparameters()`` values in its
``AttributeDict``, a ``dict`` subclass, which is rebuilt as a plain ``dict`` subclass of ours
without importing Lightning or running any of its code. Any other class in the file is
refused (``UnsafeCheckpointError``). Only ``state_dict`` is packed, under the module's names
(a model held as ``self.model`` gives ``model.*``, as ``save_model(lightning_module)`` does);
optimizer, scheduler, loop and callback state are dropped and named in the notes.
"""

from __future__ import annotations

from pathlib import Path

from mcnc_format.converters.checkpoint import Checkpoint, read_checkpoint
from mcnc_format.converters.layout import LayoutBase

__all__ = ["LightningCheckpoint"]


class HyperParameters(dict):  # type: ignore[type-arg]
    """What Lightning's ``AttributeDict`` (hyperparameters) is rebuilt as: a plain dict."""


# Where Lightning's AttributeDict lives: the ``lightning`` package and the standalone
# ``lightning_fabric`` one that ``pytorch_lightning`` uses.
ALLOWED = ((HyperParameters, "lightning.fabric.utilities.data.AttributeDict"),
           (HyperParameters, "lightning_fabric.utilities.data.AttributeDict"))


class LightningCheckpoint(LayoutBase):
    name = "lightning-ckpt"
    description = "PyTorch Lightning .ckpt files (Trainer.save_checkpoint, ModelCheckpoint)"

    def recognises(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".ckpt"

    def read(self, path: Path) -> Checkpoint:
        return read_checkpoint(path, entry="state_dict", allowed_globals=ALLOWED)
