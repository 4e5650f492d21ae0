"""Serving many MCNC-LoRA adapters over one base model (docs/serving.md).

``AdapterBank`` keeps each adapter on the device as its alpha, beta and generator seed
(kilobytes), rebuilds its LoRA factors with the engine when a batch needs them (an LRU of
rebuilt factors bounds the memory), and runs a batch whose rows use different adapters in
one forward of the base model: the base Linear's output plus a low-rank path per row group,
in torch or in Punica-style SGMV Triton kernels (``Route``).
"""

from .adapter import Factors
from .bank import AdapterBank, BankStats
from .route import Route

__all__ = ["AdapterBank", "BankStats", "Factors", "Route"]
