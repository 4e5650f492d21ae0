"""Hugging Face transformers models in and out of ``.mcnc``: ``from_pretrained``,
``save_pretrained`` and ``push_to_hub`` for a folder or Hub repository holding ``config.json``
and ``model.mcnc`` (plus the generation config, the tokenizer and a model card where there are
some).

Why an entry point of our own rather than ``AutoModel*.from_pretrained``: transformers looks
for ``model.safetensors`` / ``pytorch_model.bin`` (or a safetensors file named by
``config.transformers_weights``) and offers no supported hook that changes where the weights
come from: its quantizer hooks run around weight loading, not instead of finding the files.
docs/transformers.md says how plain transformers can still be handed the weights
(``from_pretrained(None, config=..., state_dict=mcnc_format.load(...))``).
"""

from .loading import CONFIG_FILE, GENERATION_CONFIG_FILE, MODEL_FILE, from_pretrained
from .saving import push_to_hub, save_pretrained

__all__ = [
    "CONFIG_FILE",
    "GENERATION_CONFIG_FILE",
    "MODEL_FILE",
    "from_pretrained",
    "push_to_hub",
    "save_pretrained",
]
