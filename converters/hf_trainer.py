"""Hugging Face ``Trainer`` checkpoints: ``output_dir/checkpoint-N/``.

Layout (``transformers.Trainer._save_checkpoint``)::

    checkpoint-500/
      model.safetensors  or  model-0000x-of-0000y.safetensors + model.safetensors.index.json
                         (or pytorch_model.bin with save_safetensors=False; or, with
                         FSDP's SHARDED_STATE_DICT, the DCP folder pytorch_model_fsdp_0/
                         beside optimizer_0/)
      config.json, generation_config.json          (not read)
      trainer_state.json                           JSON: global_step, log history
      optimizer.pt, scheduler.pt, scaler.pt        pickles: never opened
      rng_state.pth, training_args.bin             pickles: never opened

The weights are read (safetensors tensor by tensor; ``.bin`` with torch's weights-only
unpickler); ``trainer_state.json`` gives the step for the notes. Optimizer, scheduler, RNG and
training-argument files are training state, and pickles of arbitrary objects: they are
skipped, unopened, and the notes say so. A fine-tune over a base packs with ``--base``.
"""

from __future__ import annotations

import json
from pathlib import Path

from mcnc_format.converters.checkpoint import Checkpoint
from mcnc_format.converters.layout import LayoutBase, left_out, require_weights

from .torch_dcp import model_or_fsdp_weights

__all__ = ["HFTrainerCheckpoint"]

STATE = "trainer_state.json"


class HFTrainerCheckpoint(LayoutBase):
    name = "hf-trainer"
    description = ("transformers Trainer checkpoint-N/ folders (trainer_state.json, "
                   "model*.safetensors)")

    def recognises(self, path: Path) -> bool:
        return path.is_dir() and (path / STATE).is_file()

    def read(self, path: Path) -> Checkpoint:
        found, notes = model_or_fsdp_weights(path)
        tensors, used = require_weights(found, path, "Trainer checkpoint")
        notes += left_out(path, [*used, path / STATE])
        step = _global_step(path / STATE)
        if step is not None:
            notes.insert(0, f"Trainer checkpoint at global step {step} ({STATE})")
        return Checkpoint(path, tensors, notes=notes)


def _global_step(state: Path) -> int | None:
    """The step ``trainer_state.json`` records; ``None`` if it cannot say (it is a note)."""
    try:
        step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError, RecursionError):  # RecursionError: JSON
        return None  # nested deeper than Python's decoder recurses
    return step if isinstance(step, int) else None
