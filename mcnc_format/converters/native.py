"""The built-in converter: state dicts of models prepared by ``mcnc_format.torch``.

``reparametrize`` and ``add_mcnc_lora`` leave a ``mcnc_config`` buffer (the manifest) in the
state dict, so such a checkpoint carries everything the file needs. Converting is
``export_state_dict``, and writing uses ``save_model``'s defaults (no metadata, no info): a
packed ``.pt`` gives the bytes ``save_model`` gives for the same model.
"""

from __future__ import annotations

from .checkpoint import Checkpoint
from .registry import Conversion

__all__ = ["NativeConverter"]


class NativeConverter:
    """Checkpoints holding an ``mcnc_config`` manifest (``mcnc_format.torch``)."""

    name = "mcnc-torch"
    description = "state dicts of models reparametrized or adapted by mcnc_format.torch"

    def detect(self, checkpoint: Checkpoint) -> bool:
        from ..torch.manifest import CONFIG_KEY

        return any(k == CONFIG_KEY or k.endswith("." + CONFIG_KEY) for k in checkpoint.tensors)

    def convert(self, checkpoint: Checkpoint) -> Conversion:
        from ..torch.export import export_state_dict

        return Conversion(export_state_dict(checkpoint.tensors))
