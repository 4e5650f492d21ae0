"""Accelerate ``save_state`` folders.

Layout (``accelerate.Accelerator.save_state(output_dir)``)::

    output_dir/
      model.safetensors          the first prepared model (pytorch_model.bin with
                                 safe_serialization=False); model_1.safetensors, ... for more;
                                 with FSDP, pytorch_model_fsdp.bin (FULL_STATE_DICT) or
                                 the DCP folder pytorch_model_fsdp_0/ (SHARDED_STATE_DICT,
                                 beside optimizer_0/)
      optimizer.bin, scheduler.bin, sampler.bin    pickles: never opened
      random_states_0.pkl, scaler.pt               pickles: never opened
      custom_checkpoint_0.pkl                      registered objects: never opened

The first model's weights are packed (``--converter`` cannot pick another: pack a second
model from its own ``model_1.safetensors`` file). Everything else is training state in
pickles, skipped unopened and named in the notes.
"""

from __future__ import annotations

from pathlib import Path

from mcnc_format.converters.checkpoint import Checkpoint
from mcnc_format.converters.layout import LayoutBase, left_out, require_weights

from .torch_dcp import model_or_fsdp_weights

__all__ = ["AccelerateState"]

# What save_state writes besides the models (a folder with a model file and one of these).
STATE_FILES = ("random_states_0.pkl", "optimizer.bin", "scheduler.bin")


class AccelerateState(LayoutBase):
    name = "accelerate-state"
    description = "Accelerate save_state folders (model.safetensors, random_states_0.pkl, ...)"

    def recognises(self, path: Path) -> bool:
        return (path.is_dir() and not (path / "trainer_state.json").exists()
                and any((path / f).is_file() for f in STATE_FILES))

    def read(self, path: Path) -> Checkpoint:
        found, notes = model_or_fsdp_weights(path)
        tensors, used = require_weights(found, path, "save_state")
        return Checkpoint(path, tensors, notes=notes + left_out(path, used))
