"""``mcnc demo``: MCNC end to end in under a minute, on data that ships with the package.

A small MLP (64 -> 256 -> 256 -> 10) learns the handwritten digits twice from the same
initialisation: once densely, once with its three weight matrices reparametrized by MCNC
(``mcnc_format.torch``). The MCNC model's state dict is saved as a plain ``.pt``, packed with
``mcnc pack``'s own function, loaded back into a fresh MLP, and its predictions compared with
the trained model's. The settings are fixed and seeded, so every run prints the same story.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import load_into
from .api import open as open_file
from .atomic import atomic_path
from .converters.pack import pack
from .errors import WriteError
from .examples.digits import N_CLASSES, N_FEATURES, DigitsSplit, split_digits
from .safetensors_out import save_safetensors

__all__ = ["DemoResult", "DemoSettings", "run_demo"]

MCNC_FILE = "digits.mcnc"
CHECKPOINT_FILE = "digits-mcnc.pt"
DENSE_FILE = "digits-dense.safetensors"


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains. ``d / (k + 1)`` bounds the compression of the weight matrices
    (the paper's ratio); k = 8, d = 400 gives 44x. Adam at 0.02 for alpha and beta (the paper
    uses 0.05 on larger models; 0.02 is steadier over a few epochs here)."""

    hidden: int = 256
    k: int = 8
    d: int = 400
    generator_hidden: tuple[int, ...] = (32, 32)
    L: float = 20.0
    mcnc_lr: float = 0.02
    dense_lr: float = 1e-3
    epochs: int = 30
    batch_size: int = 64
    seed: int = 0

    def quick(self) -> DemoSettings:
        """A few epochs only: for tests and a first look (accuracy is lower)."""
        return DemoSettings(**{**asdict(self), "epochs": 3})


@dataclass(frozen=True)
class DemoResult:
    """The demo's figures; ``to_json`` is what ``mcnc demo --json`` prints."""

    weights_ratio: float  # compressed parameters / stored alpha-beta values (README)
    file_ratio: float  # dense bytes / .mcnc file bytes (README)
    mcnc_test_accuracy: float
    dense_test_accuracy: float
    file_bytes: int
    dense_bytes: int  # the weights' dense size, as mcnc inspect counts it
    dense_file_bytes: int  # the dense model's safetensors file
    compressed_parameters: int
    stored_values: int
    parameters: int
    load_seconds: float
    train_seconds_mcnc: float
    train_seconds_dense: float
    predictions_match: bool
    max_logit_difference: float
    epochs: int
    mcnc_file: str
    dense_file: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_mlp(hidden: int, seed: int) -> nn.Sequential:
    """64 -> hidden -> hidden -> 10 with ReLU, PyTorch's default init under ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, N_CLASSES))


def run_demo(
    settings: DemoSettings = DemoSettings(),
    out_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = lambda _message: None,
) -> DemoResult:
    """Train, pack, reload and compare. Files go to ``out_dir`` (kept) or a temporary folder
    (removed). ``log`` receives one line per step."""
    with _one_thread():
        if out_dir is None:
            with tempfile.TemporaryDirectory(prefix="mcnc-demo-") as tmp:
                return _run(settings, Path(tmp), log)
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return _run(settings, folder, log)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Batches of 64 x 256 are too small to gain from threads, and on a shared machine
    extra threads wait for each other: one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run(settings: DemoSettings, folder: Path, log: Callable[[str], None]) -> DemoResult:
    from .torch import MCNCConfig, reparametrize

    data = split_digits(seed=settings.seed)
    log(f"digits: {len(data.x_train)} training and {len(data.x_test)} test images (8x8)")

    dense = make_mlp(settings.hidden, settings.seed)
    dense_seconds = _train(dense, data, settings, settings.dense_lr)
    dense_accuracy = _accuracy(dense, data)
    dense_file_bytes = save_safetensors(folder / DENSE_FILE, dense.state_dict(), None,
                                        overwrite=True)
    log(f"dense MLP:  test accuracy {dense_accuracy:.2%} ({dense_seconds:.1f} s)")

    config = MCNCConfig(k=settings.k, d=settings.d, hidden=settings.generator_hidden,
                        L=settings.L, seed=settings.seed, chunking="model",
                        train_dense=True)
    model = reparametrize(make_mlp(settings.hidden, settings.seed), config)
    mcnc_seconds = _train(model, data, settings, settings.mcnc_lr)
    mcnc_accuracy = _accuracy(model, data)
    log(f"MCNC MLP:   test accuracy {mcnc_accuracy:.2%} ({mcnc_seconds:.1f} s)")

    with atomic_path(folder / CHECKPOINT_FILE, overwrite=True) as tmp:
        try:
            torch.save(model.state_dict(), tmp)
        except RuntimeError as exc:  # torch's zip writer reports a full disk this way
            raise WriteError(f"{folder / CHECKPOINT_FILE}: writing the checkpoint failed: "
                             f"{exc}") from exc
    pack(folder / CHECKPOINT_FILE, folder / MCNC_FILE, force=True)
    with open_file(folder / MCNC_FILE) as f:
        summary = f.summary()

    start = time.perf_counter()
    fresh = make_mlp(settings.hidden, settings.seed + 1)
    load_into(fresh, folder / MCNC_FILE)
    load_seconds = time.perf_counter() - start
    with torch.no_grad():
        trained_logits = model(data.x_test)
        loaded_logits = fresh(data.x_test)
    max_difference = float((trained_logits - loaded_logits).abs().max())
    same = bool(torch.equal(trained_logits.argmax(1), loaded_logits.argmax(1)))
    log(f"reloaded:   predictions {'match' if same else 'DIFFER'} (max logit difference "
        f"{max_difference:.2e}), loaded in {load_seconds * 1000:.1f} ms")

    return DemoResult(
        weights_ratio=summary["weights_ratio"],
        file_ratio=summary["file_ratio"],
        mcnc_test_accuracy=mcnc_accuracy,
        dense_test_accuracy=dense_accuracy,
        file_bytes=summary["file_bytes"],
        dense_bytes=summary["dense_bytes"],
        dense_file_bytes=dense_file_bytes,
        compressed_parameters=summary["compressed_parameters"],
        stored_values=summary["stored_alpha_beta_values"],
        parameters=summary["parameters"],
        load_seconds=load_seconds,
        train_seconds_mcnc=mcnc_seconds,
        train_seconds_dense=dense_seconds,
        predictions_match=same,
        max_logit_difference=max_difference,
        epochs=settings.epochs,
        mcnc_file=str(folder / MCNC_FILE),
        dense_file=str(folder / DENSE_FILE),
    )


def _train(model: nn.Module, data: DigitsSplit, settings: DemoSettings, lr: float) -> float:
    """Adam on the trainable parameters, shuffled mini-batches; returns seconds taken."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    order = torch.Generator().manual_seed(settings.seed)
    n = len(data.x_train)
    start = time.perf_counter()
    model.train()
    for _ in range(settings.epochs):
        perm = torch.randperm(n, generator=order)
        for first in range(0, n, settings.batch_size):
            batch = perm[first : first + settings.batch_size]
            loss = nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return time.perf_counter() - start


def _accuracy(model: nn.Module, data: DigitsSplit) -> float:
    with torch.no_grad():
        return float((model(data.x_test).argmax(1) == data.y_test).float().mean())

