"""The one exception family of mcnc-format.

Every failure the library reports is an ``MCNCError``: callers catch that one class, or a
subclass when they want to tell failures apart. Messages name the file, the header field
(as a path such as ``tensors[3].theta0.seed``), what was expected and what was found, and
what to do about it. Rule numbers (``R12``) point into ``spec/SPEC.md``.

The file, the field, the tensor and the rule are also attributes of the error (``path``,
``field``, ``tensor``, ``rule``; ``None`` when they do not apply or the raise site does not
know them), so tools read them rather than parse the text: ``str(exc)`` is
``"{path}: {field}: {message} ({rule})"`` with the absent parts left out.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ChecksumError",
    "ConfigError",
    "DeviceMemoryError",
    "ExternalReferenceDamaged",
    "ExternalReferenceError",
    "ExternalReferenceMissing",
    "FormatError",
    "HeaderError",
    "HubError",
    "HubFileNotFoundError",
    "HubOfflineError",
    "HubPermissionError",
    "InvalidTensorError",
    "MCNCError",
    "MCNCFileNotFoundError",
    "MCNCIndexError",
    "MappingError",
    "MetaTensorError",
    "NumpyDtypeError",
    "ReparametrizeError",
    "SharedTensorError",
    "StateDictMismatchError",
    "UnknownOptionError",
    "UnsafeCheckpointError",
    "UnsupportedFeatureError",
    "UnsupportedVersionError",
    "UsageError",
    "WriteError",
]


class MCNCError(Exception):
    """Base class of every error raised by mcnc-format.

    ``message`` says what is wrong; ``rule`` is the SPEC.md rule it breaks (``"R12"``),
    ``path`` the file or URI, ``field`` the header field path (``"tensors[3].theta0.seed"``)
    and ``tensor`` the tensor's name where no field path says which tensor it is.
    """

    def __init__(self, message: str = "", *, rule: str | None = None, path: str | None = None,
                 field: str | None = None, tensor: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.rule = rule
        self.path = path
        self.field = field
        self.tensor = tensor

    def __str__(self) -> str:
        text = ": ".join(part for part in (self.path, self.field, self.message) if part)
        return f"{text} ({self.rule})" if self.rule else text

    def to_dict(self) -> dict[str, str | None]:
        """JSON-ready: ``error`` (the class name), ``message``, ``rule``, ``path``, ``field``,
        ``tensor``."""
        return {"error": type(self).__name__, "message": self.message, "rule": self.rule,
                "path": self.path, "field": self.field, "tensor": self.tensor}

    def __reduce__(self) -> tuple[Any, ...]:
        fields = {"rule": self.rule, "path": self.path, "field": self.field,
                  "tensor": self.tensor}
        return (_rebuild, (type(self), self.message, fields), self.__dict__)


class FormatError(MCNCError, ValueError):
    """Raised when a file's bytes do not follow the container layout (magic, preamble,
    truncation, blob placement): the file is not an ``.mcnc`` file or is damaged."""


class ChecksumError(FormatError):
    """Raised when the header or a blob does not match its XXH3-64 checksum: the bytes were
    changed after writing (disk or transfer corruption). Re-download or re-write the file."""


class HeaderError(FormatError):
    """Raised when the header decodes but breaks a validation rule of the spec (a missing or
    mistyped field, a limit exceeded, an inconsistent size, an unknown reference)."""


class UnsupportedVersionError(MCNCError):
    """Raised when the file's major format version is not one this reader implements."""


class UnsupportedFeatureError(MCNCError):
    """Raised when a tensor uses an encoding, codec, dtype, theta0 kind or scheme that this
    reader does not know (typically written by a newer minor version). Other tensors of the
    same file stay readable."""


class ExternalReferenceError(MCNCError):
    """Raised when a theta0 reference to another file cannot be resolved: the file or tensor
    is missing, or its bytes do not match the pinned sha256."""


class ExternalReferenceDamaged(ExternalReferenceError):
    """Raised when a referenced base file is unreadable or its bytes do not match the pinned
    sha256 (damage, not a wrong reference): a fresh download may help."""


class ExternalReferenceMissing(ExternalReferenceError):
    """Raised when a referenced base checkpoint cannot be opened where the reference points
    (no such file, or not a regular file): the referencing file itself may be intact. Put the
    base there, or open the file where its base is."""


class WriteError(MCNCError):
    """Raised when a file cannot be written: invalid inputs to the writer, or an I/O failure.
    The previous file at the target path, if any, is left untouched."""


class InvalidTensorError(WriteError, ValueError):
    """Raised when a value cannot be written as it is: not a tensor (or the tensors not a
    dict), sparse or not contiguous. The message says how to turn it into one that can
    (``.to_dense()``, ``.contiguous()``)."""


class MetaTensorError(WriteError, RuntimeError):
    """Raised when a tensor to write is on the meta device: it has shape and dtype but no
    data (torch raises a ``RuntimeError`` copying out of it). Materialise it first."""


class SharedTensorError(WriteError, RuntimeError):
    """Raised when tensors given to a plain save share memory (tied weights, views of one
    buffer): each would be stored on its own and come back untied. ``save_model`` keeps one
    name of each tie; ``.clone()`` makes them independent."""


class DeviceMemoryError(MCNCError, MemoryError):
    """Raised when regenerating weights on a device runs out of memory; the message gives the
    sizes that were requested."""


class MappingError(MCNCError, ValueError):
    """A mapping file that is malformed or does not fit the checkpoint it is applied to."""


class ConfigError(MCNCError, ValueError):
    """A model config (transformers' ``config.json``) that names no model class of its model
    type, or that describes a model other than the one its weights file holds."""


class ReparametrizeError(MCNCError, ValueError):
    """Raised when a model cannot be reparametrized, trained or exported as asked: an invalid
    ``MCNCConfig`` field, a selection that matches no parameter, tied or lazy parameters, a
    merged LoRA at export, or a state dict that is not a reparametrized one."""


class UnsafeCheckpointError(MCNCError):
    """Raised when a checkpoint would need pickle execution to load (it holds objects other
    than tensors and plain containers). Re-save it as a plain state dict or as safetensors."""


class HubError(MCNCError):
    """Raised for Hugging Face Hub failures that are not covered by a subclass."""


class HubFileNotFoundError(HubError, FileNotFoundError):
    """Raised when a Hub repository, revision or file does not exist."""


class HubPermissionError(HubError, PermissionError):
    """Raised when the Hub refuses access (missing or insufficient token)."""


class HubOfflineError(HubError):
    """Raised when offline mode is on (``HF_HUB_OFFLINE=1``) and the file is not cached."""


def _rebuild(cls: type[MCNCError], message: str, fields: dict[str, str | None]) -> MCNCError:
    """Unpickle an ``MCNCError`` (the fields are keyword-only, which ``args`` cannot carry)."""
    return cls(message, **fields)


class UsageError(MCNCError, ValueError):
    """Raised when an argument cannot be honoured: a device that does not exist here, an
    output dtype that is not floating point, a box outside its tensor."""


class UnknownOptionError(UsageError, TypeError):
    """Raised when a keyword option is not one the call takes (a misspelling such as
    ``devcie=``): also a ``TypeError``, as Python's own error for an unexpected keyword is."""


class MCNCIndexError(UsageError, IndexError):
    """Raised when an index does not fit its tensor: an integer out of range, more indices
    than dimensions, an integer or slice on a 0-d tensor (an ``IndexError``, as torch and
    safetensors raise)."""


class NumpyDtypeError(MCNCError, TypeError):
    """Raised when a tensor is asked for as a numpy array and numpy has no dtype for it:
    bf16 unless ``ml_dtypes`` (which registers numpy's ``bfloat16``) is imported, the
    ``TypeError`` safetensors' numpy path raises too."""


class MCNCFileNotFoundError(MCNCError, FileNotFoundError):
    """Raised when a local file to read does not exist."""


class StateDictMismatchError(MCNCError, RuntimeError):
    """Raised by a load into a module when the file's names and the module's differ (missing
    or unexpected names, with ``strict``) or a tensor's shape differs from its parameter's
    (strict or not), as ``load_state_dict`` raises a ``RuntimeError``."""
