"""Train in the MCNC manifold with PyTorch, and save what was trained as ``.mcnc``.

``reparametrize(model, MCNCConfig(...))`` turns the selected weights of any ``nn.Module``
into ``theta0 + sum_j beta_j phi(alpha_j)`` per chunk; ``add_mcnc_lora`` does the same for
LoRA factors (the paper's LLM setting). ``save_model(model, path)`` writes the ``.mcnc``
file; ``export_state_dict(state_dict)`` gives the writer's inputs from a saved state dict
alone (what ``mcnc-pack`` uses). docs/torch.md covers the choices and the state-dict layout.
"""

from .budget import LORA_RECIPE, LoRARecipe, choose_d, payload_values
from .config import MCNCConfig
from .export import export_state_dict, save_model
from .lora import (
    MCNCLoRALinear,
    add_mcnc_lora,
    lora_factor_sizes,
    mcnc_lora_config,
    merge_mcnc_lora,
    unmerge_mcnc_lora,
)
from .manifest import Manifest
from .reparam import reparametrize

__all__ = [
    "LORA_RECIPE",
    "LoRARecipe",
    "MCNCConfig",
    "MCNCLoRALinear",
    "Manifest",
    "add_mcnc_lora",
    "choose_d",
    "export_state_dict",
    "lora_factor_sizes",
    "mcnc_lora_config",
    "merge_mcnc_lora",
    "payload_values",
    "reparametrize",
    "save_model",
    "unmerge_mcnc_lora",
]
