"""The handwritten digits data set (8x8 images, 10 classes, 1,797 samples).

``digits.csv.gz`` is a byte-identical copy of scikit-learn's ``sklearn/datasets/data/
digits.csv.gz`` (sha256 ``09f66e6d...23aa22``): the test set of the UCI "Optical Recognition of
Handwritten Digits" data (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0). Each row holds 64 pixel
counts in 0..16 and the label. It ships inside the package so the demo runs offline and
without scikit-learn.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

__all__ = ["DigitsSplit", "load_digits", "split_digits"]

N_FEATURES = 64
N_CLASSES = 10
PIXEL_MAX = 16.0


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [1797, 64] float32 in [0, 1], y [1797] int64)``."""
    with resources.files(__package__).joinpath("digits.csv.gz").open("rb") as raw, \
            gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :N_FEATURES] / PIXEL_MAX)
    y = torch.from_numpy(table[:, N_FEATURES].astype(np.int64))
    return x, y


@dataclass(frozen=True)
class DigitsSplit:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def split_digits(test_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """A fixed, seeded train/test split (the same one on every run with the same seed)."""
    x, y = load_digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return DigitsSplit(x[train], y[train], x[test], y[test])
