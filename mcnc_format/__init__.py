"""mcnc-format: store, ship and load MCNC-compressed neural networks.

The public API is what ``__all__`` lists; everything else is internal. See ``spec/SPEC.md`` for
the file format and README.md for a tour.
"""

from .api import load, load_into, open, stream
from .engine.options import LoadOptions, Precision, Progress, Verify
from .errors import (
    ChecksumError,
    DeviceMemoryError,
    ExternalReferenceDamaged,
    ExternalReferenceError,
    FormatError,
    HeaderError,
    HubError,
    HubFileNotFoundError,
    HubOfflineError,
    HubPermissionError,
    MappingError,
    MCNCError,
    ReparametrizeError,
    UnsafeCheckpointError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
    UsageError,
    WriteError,
)
from .generator import GeneratorSpec
from .reader import MCNCFile, TensorInfo, TensorSlice
from .torch import save_model
from .writer import MCNC, Dense, LoRA, Segment, Theta0, save

__version__ = "0.1.0"

__all__ = [
    "MCNC",
    "ChecksumError",
    "Dense",
    "DeviceMemoryError",
    "ExternalReferenceDamaged",
    "ExternalReferenceError",
    "FormatError",
    "GeneratorSpec",
    "HeaderError",
    "HubError",
    "HubFileNotFoundError",
    "HubOfflineError",
    "HubPermissionError",
    "LoRA",
    "LoadOptions",
    "MCNCError",
    "MCNCFile",
    "MappingError",
    "Precision",
    "Progress",
    "ReparametrizeError",
    "Segment",
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
