"""``save_pretrained`` folders: one ``model.safetensors``, or a shard set.

Layout (what ``PreTrainedModel.save_pretrained`` and ``huggingface_hub.save_torch_state_dict``
write)::

    model/
      config.json                                  (not read)
      model.safetensors                            one file, or shards:
      model-00001-of-00003.safetensors ...
      model.safetensors.index.json                 {"metadata": ..., "weight_map": {name: shard}}

The path may be the folder or its ``model.safetensors.index.json``. Tensors are read one at a
time from their shard (safetensors: no code at all); folders that also hold training state
belong to the Trainer or Accelerate layouts, not this one.
"""

from __future__ import annotations

from pathlib import Path

from mcnc_format.converters.checkpoint import Checkpoint
from mcnc_format.converters.layout import LayoutBase, left_out, model_weights, require_weights

__all__ = ["SafetensorsShards"]

INDEX = "model.safetensors.index.json"
# Files that make a folder another layout's (Trainer, Accelerate).
TRAINING_MARKERS = ("trainer_state.json", "random_states_0.pkl", "optimizer.bin")


class SafetensorsShards(LayoutBase):
    name = "safetensors-shards"
    description = ("save_pretrained folders: model.safetensors, or shards listed by "
                   "model.safetensors.index.json")

    def recognises(self, path: Path) -> bool:
        if path.is_file():
            return path.name == INDEX
        return (path.is_dir() and any((path / f).is_file() for f in (INDEX, "model.safetensors"))
                and not any((path / f).exists() for f in TRAINING_MARKERS))

    def read(self, path: Path) -> Checkpoint:
        folder = path.parent if path.is_file() else path
        tensors, used = require_weights(model_weights(folder), folder, "save_pretrained")
        return Checkpoint(folder, tensors, notes=left_out(folder, used))
