"""mcnc-format: store, ship and load MCNC-compressed neural networks.

The public API is what ``__all__`` lists; everything else is internal. See ``spec/SPEC.md`` for
the file format and README.md for a tour.

Attributes are imported on first use (PEP 562): ``import mcnc_format`` loads neither torch nor
any integration, so header-level work (the CLI's ``inspect``, ``--help``) starts at once, and
touching ``mcnc_format.load`` or ``mcnc_format.save`` brings in what they need.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from .errors import (
    ChecksumError,
    ConfigError,
    DeviceMemoryError,
    ExternalReferenceDamaged,
    ExternalReferenceError,
    ExternalReferenceMissing,
    FormatError,
    HeaderError,
    HubError,
    HubFileNotFoundError,
    HubOfflineError,
    HubPermissionError,
    InvalidTensorError,
    MappingError,
    MCNCError,
    MCNCFileNotFoundError,
    MCNCIndexError,
    MetaTensorError,
    NumpyDtypeError,
    ReparametrizeError,
    SharedTensorError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
    UsageError,
    WriteError,
)

if TYPE_CHECKING:
    from .api import load, load_into, open, stream
    from .engine.options import Precision, Progress, Verify
    from .generator import GeneratorSpec
    from .reader import MCNCFile, TensorInfo, TensorSlice
    from .torch import save_model
    from .writer import MCNC, Dense, LoRA, Segment, Theta0, save

__version__ = "0.1.0"

#: Where each lazily imported public name lives.
_LAZY = {
    "load": "api", "load_into": "api", "open": "api", "stream": "api",
    "Precision": "engine.options", "Progress": "engine.options", "Verify": "engine.options",
    "GeneratorSpec": "generator",
    "MCNCFile": "reader", "TensorInfo": "reader", "TensorSlice": "reader",
    "save_model": "torch",
    "MCNC": "writer", "Dense": "writer", "LoRA": "writer", "Segment": "writer",
    "Theta0": "writer", "save": "writer",
}
#: Names kept for one release with a DeprecationWarning (CHANGELOG.md): the new spelling.
_DEPRECATED = {"LoadOptions": ("engine.options", "the keyword options of load/stream/load_into")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _DEPRECATED:
        module, instead = _DEPRECATED[name]
        warnings.warn(f"mcnc_format.{name} is deprecated and will be removed in the next "
                      f"release; use {instead}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f".{module}", __name__), name)
    raise AttributeError(f"module 'mcnc_format' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "MCNC",
    "ChecksumError",
    "ConfigError",
    "Dense",
    "DeviceMemoryError",
    "ExternalReferenceDamaged",
    "ExternalReferenceError",
    "ExternalReferenceMissing",
    "FormatError",
    "GeneratorSpec",
    "HeaderError",
    "HubError",
    "HubFileNotFoundError",
    "HubOfflineError",
    "HubPermissionError",
    "InvalidTensorError",
    "LoRA",
    "MCNCError",
    "MCNCFile",
    "MCNCFileNotFoundError",
    "MCNCIndexError",
    "MappingError",
    "MetaTensorError",
    "NumpyDtypeError",
    "Precision",
    "Progress",
    "ReparametrizeError",
    "Segment",
    "SharedTensorError",
    "StateDictMismatchError",
    "TensorInfo",
    "TensorSlice",
    "Theta0",
    "UnsafeCheckpointError",
    "UnsupportedFeatureError",
    "UnsupportedVersionError",
    "UsageError",
    "Verify",
    "WriteError",
    "__version__",
    "load",
    "load_into",
    "open",
    "save",
    "save_model",
    "stream",
]
