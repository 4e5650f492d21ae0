"""The top-level verbs: ``open``, ``load``, ``stream`` and ``load_into``.

They are the core's reader with one addition: names may be ``hf://`` URIs, resolved through
the Hub layer, which is imported only when such a name is met (reading local files never
imports the Hub client). Every option of a load is a typed keyword (``LoadKeywords``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypedDict, TypeVar

import torch
from typing_extensions import Unpack

from .engine.options import DEFAULT_STAGING_BYTES, LoadOptions, Precision, Progress, Verify
from .engine.resolve import HUB_SCHEME, LocalResolver, Resolver
from .errors import MCNCError
from .reader import Boxes, MCNCFile

__all__ = ["DefaultResolver", "LoadKeywords", "load", "load_into", "open", "stream"]

PathLike = str | os.PathLike[str]
T = TypeVar("T")


class DefaultResolver:
    """Local paths as they are; ``hf://`` names through ``mcnc_format.hub.HubResolver``."""

    def __init__(self) -> None:
        self._hub: Resolver | None = None

    def hub(self) -> Resolver:
        if self._hub is None:
            from .hub import HubResolver

            self._hub = HubResolver()
        return self._hub

    def local_path(self, name: str | os.PathLike[str]) -> Path:
        text = os.fspath(name)
        return self.hub().local_path(text) if text.startswith(HUB_SCHEME) else Path(text)

    def reference(self, uri: str, source: str, read: Callable[[Path], T]) -> T:
        if uri.startswith(HUB_SCHEME) or source.startswith(HUB_SCHEME):
            return self.hub().reference(uri, source, read)
        return LocalResolver().reference(uri, source, read)


class LoadKeywords(TypedDict, total=False):
    """The options of ``load``, ``stream`` and ``load_into``.

    ``names``: the tensors to load (all by default). ``boxes``: a box per name
    (``{"w": (slice(0, 128), slice(None))}``) to load only that part. ``staging_bytes``,
    ``workspace_bytes``, ``use_triton``, ``precision``, ``verify``, ``progress``: as
    ``LoadOptions`` says. ``resolver``: where names and theta0 references are read from.
    """

    names: Iterable[str] | None
    boxes: Boxes | None
    staging_bytes: int
    workspace_bytes: int | None
    use_triton: bool | None
    precision: Precision | str
    verify: bool | str | Verify
    progress: Callable[[Progress], None] | None
    resolver: Resolver | None


def open(path: PathLike, *, verify: bool = True,
         resolver: Resolver | None = None) -> MCNCFile:
    """Open an ``.mcnc`` file, a path or ``hf://ORG/REPO[@REV]/FILE`` (header only)."""
    return MCNCFile(path, verify=verify, resolver=resolver or DefaultResolver())


def stream(path: PathLike, device: torch.device | str = "cpu",
           dtype: torch.dtype | str | None = None, **options: Unpack[LoadKeywords]
           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for the file's tensors (or ``names``) on ``device`` as each
    is complete, so a caller can place weights while later ones are rebuilt. ``dtype``
    overrides float dtypes. On CUDA, tensors are ordered on the current stream of
    ``device``."""
    load_options = LoadOptions(
        staging_bytes=options.get("staging_bytes", DEFAULT_STAGING_BYTES),
        workspace_bytes=options.get("workspace_bytes"),
        use_triton=options.get("use_triton"),
        precision=Precision.of(options.get("precision", Precision.AUTO)),
        verify=Verify.of(options.get("verify", Verify.CACHED)),
        progress=options.get("progress"),
    )
    with open(path, verify=load_options.verify, resolver=options.get("resolver")) as f:
        yield from f.stream(options.get("names"), device, dtype, boxes=options.get("boxes"),
                            options=load_options)


def load(path: PathLike, device: torch.device | str = "cpu",
         dtype: torch.dtype | str | None = None, **options: Unpack[LoadKeywords]
         ) -> dict[str, torch.Tensor]:
    """Every tensor (or ``names``, or ``boxes`` of them) of a file on ``device``."""
    return dict(stream(path, device, dtype, **options))


def load_into(module: torch.nn.Module, path: PathLike, device: torch.device | str = "cpu",
              strict: bool = True, dtype: torch.dtype | str | None = None,
              **options: Unpack[LoadKeywords]) -> tuple[list[str], list[str]]:
    """Fill ``module``'s parameters and buffers from a file; returns (missing, unexpected).

    A module built on the meta device gets the loaded tensors assigned (``assign=True``), so
    its weights exist only on ``device``; otherwise each tensor is copied into the existing
    parameter as it arrives and released, so the peak is the module plus one tensor.
    Shapes and names are checked before anything is loaded.

    Tied tensors (one parameter under several names, e.g. ``lm_head.weight`` and
    ``embed_tokens.weight``) stay tied: the file needs only one of their names (what
    ``mcnc_format.torch`` writes for a tied compressed tensor), and after loading every name
    holds the tensor loaded under the first name the file has.
    """
    targets = module.state_dict(keep_vars=True)
    with open(path, verify=False, resolver=options.get("resolver")) as f:
        shapes = {t.name: t.shape for t in f.header.tensors}
    ties = [names for names in _tied_names(module, targets) if set(names) & set(shapes)]
    covered = {name for names in ties for name in names}
    missing = sorted(set(targets) - set(shapes) - covered)
    unexpected = sorted(set(shapes) - set(targets))
    if strict and (missing or unexpected):
        raise MCNCError(
            f"{path}: does not match the module: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}. Pass strict=False to load what matches."
        )
    wanted = [n for n in shapes if n in targets]
    for name in wanted:
        if tuple(targets[name].shape) != shapes[name]:
            raise MCNCError(f"{path}: tensor {name!r} has shape {list(shapes[name])}, the "
                            f"module expects {list(targets[name].shape)}")
    on_meta = any(t.is_meta for t in targets.values())
    options["names"] = wanted
    loaded = stream(path, device, dtype, **options)
    if on_meta:
        module.load_state_dict(dict(loaded), strict=False, assign=True)
        for names in ties:
            _tie(module, next(n for n in names if n in shapes), names)
    else:
        with torch.no_grad():
            for name, tensor in loaded:
                targets[name].copy_(tensor)
    return missing, unexpected


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
