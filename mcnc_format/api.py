"""The top-level verbs: ``open``, ``load``, ``stream`` and ``load_into``.

Names may be local paths or ``hf://`` URIs (resolved by ``engine.resolve.DefaultResolver``,
which loads the Hub layer only when such a name is met). Every option of a load is a keyword
(``LoadKeywords``); an unknown keyword is refused with the closest valid one, since a
misspelled option silently ignored would load something other than what was asked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypedDict

import torch
from typing_extensions import Unpack

from .devices import check_device
from .engine.options import LoadOptions, Precision, Progress, Verify
from .engine.resolve import DefaultResolver, Resolver
from .errors import StateDictMismatchError, UsageError
from .reader import Boxes, MCNCFile

__all__ = ["STRICT_HINT", "LoadKeywords", "ModuleLoadKeywords", "load", "load_into", "open",
           "stream"]

PathLike = str | os.PathLike[str]
#: How a strict ``load_into`` mismatch ends; callers without ``strict`` replace it.
STRICT_HINT = " Pass strict=False to load what matches."


class ModuleLoadKeywords(TypedDict, total=False):
    """The options of ``load_into``: ``staging_bytes``, ``workspace_bytes``, ``use_triton``,
    ``precision``, ``verify``, ``progress``: as ``engine.options.LoadOptions`` says.
    ``resolver``: where names and theta0 references are read from.
    """

    staging_bytes: int
    workspace_bytes: int | None
    use_triton: bool | None
    precision: Precision | str
    verify: bool | str | Verify
    progress: Callable[[Progress], None] | bool | None
    resolver: Resolver | None


class LoadKeywords(ModuleLoadKeywords, total=False):
    """The options of ``load`` and ``stream``: those of ``load_into``, and ``names`` (the
    tensors to load, all by default) and ``boxes`` (a box per name,
    ``{"w": (slice(0, 128), slice(None))}``, to load only that part)."""

    names: Iterable[str] | None
    boxes: Boxes | None


#: Keywords of the verbs that are not ``LoadOptions`` fields (and their named parameters,
#: so a misspelling of one is pointed at it).
_REQUEST_KEYWORDS = ("names", "boxes", "resolver", "path", "device", "dtype")


def _load_options(call: str, options: LoadKeywords) -> LoadOptions:
    return LoadOptions.from_keywords(call, options, _REQUEST_KEYWORDS)


def open(path: PathLike, *, verify: bool | str | Verify = True,
         resolver: Resolver | None = None) -> MCNCFile:
    """Open an ``.mcnc`` file, a path or ``hf://ORG/REPO[@REV]/FILE`` (header only)."""
    return MCNCFile(path, verify=verify, resolver=resolver or DefaultResolver())


def stream(path: PathLike, device: torch.device | str = "cpu",
           dtype: torch.dtype | str | None = None, **options: Unpack[LoadKeywords]
           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for the file's tensors (or ``names``) on ``device`` as each
    is complete, so a caller can place weights while later ones are rebuilt. ``dtype``
    overrides float dtypes. On CUDA, tensors are ordered on the current stream of
    ``device``. Unknown keywords are refused before anything is opened."""
    load_options = _load_options("stream", options)
    return _stream(path, device, dtype, load_options, options.get("resolver"),
                   options.get("names"), options.get("boxes"))


def _stream(path: PathLike, device: torch.device | str, dtype: torch.dtype | str | None,
            load_options: LoadOptions, resolver: Resolver | None,
            names: Iterable[str] | None = None, boxes: Boxes | None = None
            ) -> Iterator[tuple[str, torch.Tensor]]:
    with open(path, verify=load_options.verify, resolver=resolver) as f:
        yield from f.stream(names, device, dtype, boxes=boxes, options=load_options)


def load(path: PathLike, device: torch.device | str = "cpu",
         dtype: torch.dtype | str | None = None, **options: Unpack[LoadKeywords]
         ) -> dict[str, torch.Tensor]:
    """Every tensor (or ``names``, or ``boxes`` of them) of a file on ``device``."""
    load_options = _load_options("load", options)
    return dict(_stream(path, device, dtype, load_options, options.get("resolver"),
                        options.get("names"), options.get("boxes")))


def load_into(module: torch.nn.Module, path: PathLike, device: torch.device | str = "cpu",
              strict: bool = True, dtype: torch.dtype | str | None = None,
              **options: Unpack[ModuleLoadKeywords]) -> tuple[list[str], list[str]]:
    """Fill ``module``'s parameters and buffers from a file; returns (missing, unexpected).
    With ``strict``, names that differ raise ``StateDictMismatchError`` (a ``RuntimeError``,
    as ``load_state_dict`` raises) before anything is loaded.

    A module built on the meta device gets the loaded tensors assigned (``assign=True``), so
    its weights exist only on ``device``; otherwise each tensor is copied into the existing
    parameter as it arrives and released, so the peak is the module plus one tensor.
    Shapes and names are checked before anything is loaded.

    Tied tensors (one parameter under several names, e.g. ``lm_head.weight`` and
    ``embed_tokens.weight``) stay tied: the file needs only one of their names (what
    ``mcnc_format.torch`` writes for a tied compressed tensor), and after loading every name
    holds the tensor loaded under the first name the file has.
    """
    for keyword, refusal in _NOT_INTO.items():
        if keyword in options:
            raise UsageError(f"load_into() {refusal}")
    load_options = LoadOptions.from_keywords("load_into", options,
                                             (*_REQUEST_KEYWORDS, "module", "strict"))
    targets = module.state_dict(keep_vars=True)
    on_meta = any(t.is_meta for t in targets.values())
    if check_device(device).type == "meta" and not on_meta:
        raise UsageError("load_into(device='meta') gives shapes only, with no values to copy "
                         "into the module's parameters; load onto the device that will use "
                         "them (a module built on the meta device takes device='meta')")
    with open(path, verify=False, resolver=options.get("resolver")) as f:
        shapes = {t.name: t.shape for t in f.header.tensors}
    ties = [names for names in _tied_names(module, targets) if set(names) & set(shapes)]
    covered = {name for names in ties for name in names}
    missing = sorted(set(targets) - set(shapes) - covered)
    unexpected = sorted(set(shapes) - set(targets))
    if strict and (missing or unexpected):
        raise StateDictMismatchError(
            f"{path}: does not match the module: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}.{STRICT_HINT}")
    wanted = [n for n in shapes if n in targets]
    for name in wanted:
        if tuple(targets[name].shape) != shapes[name]:
            raise StateDictMismatchError(
                f"{path}: tensor {name!r} has shape {list(shapes[name])}, the module expects "
                f"{list(targets[name].shape)}")
    loaded = _stream(path, device, dtype, load_options, options.get("resolver"), wanted)
    if on_meta:
        module.load_state_dict(dict(loaded), strict=False, assign=True)
        for names in ties:
            _tie(module, next(n for n in names if n in shapes), names)
    else:
        with torch.no_grad():
            for name, tensor in loaded:
                targets[name].copy_(tensor)
    return missing, unexpected


#: What ``load_into`` refuses although ``load`` takes it, and why: it fills whole parameters.
_NOT_INTO = {
    "boxes": "fills whole parameters and takes no boxes= (a box would be broadcast into its "
             "parameter); load parts of tensors with mcnc_format.load(path, boxes=...), or "
             "shards into a sharded model with mcnc_format.distributed",
    "names": "loads every tensor the file and the module share and takes no names=; give "
             "strict=False to load into a module that holds only some of the file's tensors, "
             "or use mcnc_format.load(path, names=...) for a dict",
}


def _tied_names(module: torch.nn.Module, targets: dict[str, torch.Tensor]) -> list[list[str]]:
    """Groups of state-dict names that hold one tensor object (in state-dict order)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in targets.items():
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _tie(module: torch.nn.Module, source: str, names: list[str]) -> None:
    """Make every name in ``names`` hold the tensor now at ``source`` (an assigning load
    replaced each name's tensor on its own module, which unties them)."""
    owner, _, attribute = source.rpartition(".")
    tensor = getattr(module.get_submodule(owner), attribute)
    for name in names:
        if name != source:
            owner, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(owner), attribute, tensor)


def __getattr__(name: str) -> object:
    if name == "DefaultResolver":  # moved to the core; kept for one release (CHANGELOG.md)
        import warnings

        warnings.warn("mcnc_format.api.DefaultResolver is deprecated; use "
                      "mcnc_format.engine.resolve.DefaultResolver", DeprecationWarning,
                      stacklevel=2)
        return DefaultResolver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
