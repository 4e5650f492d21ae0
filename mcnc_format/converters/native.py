"""The built-in converter: state dicts of models prepared by ``mcnc_format.torch``.

``reparametrize`` and ``add_mcnc_lora`` leave a ``mcnc_config`` buffer (the manifest) in the
state dict, so such a checkpoint carries everything the file needs. Converting is
``export_state_dict``, and writing uses ``save_model``'s defaults (no metadata, no info): a
packed ``.pt`` gives the bytes ``save_model`` gives for the same model.

A checkpoint read tensor by tensor (``lazy.LazyTensors``, the folder layouts) is planned on
stand-ins and streamed: only alpha, beta and the manifest are read up front, every theta0 and
dense tensor when the writer reaches it.
"""

from __future__ import annotations

from .checkpoint import Checkpoint
from .lazy import LazyTensors, planned
from .registry import MCNC_NAME_MARK, Conversion

__all__ = ["NativeConverter"]

# State-dict entries export_state_dict computes with (besides the mcnc_* ones): read up front.
_READ_UP_FRONT = ("lora_merged",)


class NativeConverter:
    """Checkpoints holding an ``mcnc_config`` manifest (``mcnc_format.torch``)."""

    name = "mcnc-torch"
    description = "state dicts of models reparametrized or adapted by mcnc_format.torch"

    def detect(self, checkpoint: Checkpoint) -> bool:
        from ..torch.manifest import CONFIG_KEY

        return any(k == CONFIG_KEY or k.endswith("." + CONFIG_KEY) for k in checkpoint.tensors)

    def convert(self, checkpoint: Checkpoint) -> Conversion:
        from ..torch.export import export_state_dict

        if isinstance(checkpoint.tensors, LazyTensors):
            return Conversion(planned(checkpoint.tensors, export_state_dict, _read_up_front))
        return Conversion(export_state_dict(checkpoint.tensors))


def _read_up_front(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return leaf.startswith(MCNC_NAME_MARK) or leaf in _READ_UP_FRONT
