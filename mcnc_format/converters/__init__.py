"""Getting weights into and out of ``.mcnc``: checkpoints, foreign layouts, PEFT.

``pack`` reads a ``.pt`` or ``.safetensors`` checkpoint without executing pickled code and
writes an ``.mcnc`` file; converters recognise checkpoint layouts (plug-ins register under the
entry-point group ``mcnc_format.converters``; the folder layouts of training stacks ship as
``mcnc_format.layouts``, from the top-level ``converters/`` folder) and mapping files describe
MCNC checkpoints of other code; ``export_peft`` writes a PEFT LoRA adapter folder.
docs/converters.md is the guide.
"""

from .checkpoint import Checkpoint, read_checkpoint
from .mapping import MappingConverter, load_mapping
from .pack import PackResult, pack
from .peft_export import PeftExport, export_peft
from .registry import (
    ENTRY_POINT_GROUP,
    Conversion,
    Converter,
    LayoutConverter,
    available_converters,
    find_converter,
    get_converter,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Checkpoint",
    "Conversion",
    "Converter",
    "LayoutConverter",
    "MappingConverter",
    "PackResult",
    "PeftExport",
    "available_converters",
    "export_peft",
    "find_converter",
    "get_converter",
    "load_mapping",
    "pack",
    "read_checkpoint",
]
