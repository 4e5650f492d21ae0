"""mcnc-format: store, ship and load MCNC-compressed neural networks.

The public API is what ``__all__`` lists; everything else is internal. See ``spec/SPEC.md`` for
the file format and README.md for a tour.
"""

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
    WriteError,
)
from .generator import GeneratorSpec
from .reader import MCNCFile, TensorInfo, load
from .reader import open_file as open
from .streaming import load_into, stream
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
    "MCNCError",
    "MCNCFile",
    "MappingError",
    "ReparametrizeError",
    "Segment",
    "TensorInfo",
    "Theta0",
    "UnsafeCheckpointError",
    "UnsupportedFeatureError",
    "UnsupportedVersionError",
    "WriteError",
    "__version__",
    "load",
    "load_into",
    "open",
    "save",
    "save_model",
    "stream",
]
