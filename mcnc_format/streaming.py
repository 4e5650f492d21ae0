"""Fast loading onto a device: ``stream``, ``load`` and ``load_into`` through the pipelined loader.

``stream`` yields ``(name, tensor)`` as each tensor is ready, so a caller can place or shard
weights while later ones are still being regenerated; ``load`` collects them; ``load_into``
fills a module, assigning into a module built on the meta device (nothing is materialised on
the CPU first) or copying into existing parameters one tensor at a time. On CUDA the loader
stages bytes through pinned buffers on a copy stream and regenerates with the fused Triton
kernel when ``mcnc-format[gpu]`` is installed (``mcnc_format.gpu``); elsewhere it runs the
eager path with the same plan. Results equal ``mcnc_format.reader``'s within SPEC.md §10.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

import torch

from .errors import MCNCError
from .gpu.pipeline import DEFAULT_STAGING_BYTES, LoadOptions, PipelinedLoader, Progress
from .reader import MCNCFile

__all__ = ["Progress", "load", "load_into", "stream"]

PathLike = str | os.PathLike[str]


def stream(
    path: PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    *,
    names: Iterable[str] | None = None,
    progress: Callable[[Progress], None] | None = None,
    staging_bytes: int = DEFAULT_STAGING_BYTES,
    workspace_bytes: int | None = None,
    use_triton: bool | None = None,
    verify: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for the file's tensors (or ``names``) on ``device``.

    ``dtype`` overrides float dtypes. ``progress`` is called with a ``Progress`` after each
    tensor. ``staging_bytes`` bounds the pinned host memory, ``workspace_bytes`` the device
    memory beyond the outputs (default ``max(64 MiB, 2 %)``). ``use_triton``: ``None`` uses the
    fused kernel on CUDA when Triton is installed. ``verify`` checks blob checksums (turn it
    off only for files this process wrote). Tensors are ordered on the current CUDA stream
    of ``device`` (which need not be the current device).
    """
    options = LoadOptions(staging_bytes=staging_bytes, workspace_bytes=workspace_bytes,
                          use_triton=use_triton, progress=progress)
    with MCNCFile(path, verify=verify) as f:
        yield from PipelinedLoader(f, device, dtype, names, options)


def load(
    path: PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    **options: object,
) -> dict[str, torch.Tensor]:
    """Every tensor (or ``names=``) of a file on ``device``; options as for ``stream``."""
    return dict(stream(path, device, dtype, **options))  # type: ignore[arg-type]


def load_into(
    module: torch.nn.Module,
    path: PathLike,
    device: torch.device | str = "cpu",
    strict: bool = True,
    dtype: torch.dtype | None = None,
    **options: object,
) -> tuple[list[str], list[str]]:
    """Fill ``module``'s parameters and buffers from a file; returns (missing, unexpected).

    A module built on the meta device gets the loaded tensors assigned (``assign=True``), so
    its weights exist only on ``device``; otherwise each tensor is copied into the existing
    parameter as it arrives and released, so the peak is the module plus one tensor.
    Shapes and names are checked before anything is loaded.
    """
    targets = module.state_dict(keep_vars=True)
    with MCNCFile(path, verify=False) as f:
        shapes = {t.name: t.shape for t in f.header.tensors}
    missing = sorted(set(targets) - set(shapes))
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
    loaded = stream(path, device, dtype, names=wanted, **options)  # type: ignore[arg-type]
    if on_meta:
        module.load_state_dict(dict(loaded), strict=False, assign=True)
    else:
        with torch.no_grad():
            for name, tensor in loaded:
                targets[name].copy_(tensor)
    return missing, unexpected
