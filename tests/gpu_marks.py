"""Marks for the tests only a GPU can run, and for the GPU paths they prove.

``needs_cuda`` skips a test without a CUDA GPU and marks it ``gpu``: ``pytest -m gpu`` is the
selection ``benchmarks/gpu_check.sh`` runs on a lent GPU. ``proves(GpuPath...)`` names the
code paths of ``engine.options.GpuPath`` whose correctness a passing test shows; the junit
report carries them (this module's collection hook, which conftest.py installs and a plain
pytest run gets with ``-p gpu_marks``), so ``benchmarks/gpu_record.py`` can tell from a run
which paths it measured correct, and ``MEASURED_ON_GPU`` grows only from such a record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

from mcnc_format.engine.options import GpuPath

F = TypeVar("F", bound=Callable[..., object])

#: The marks of a test that needs a CUDA GPU: a list, so that ``pytestmark = needs_cuda`` and
#: ``pytest.param("cuda", marks=needs_cuda)`` work as well as the ``requires_cuda`` decorator.
needs_cuda = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def requires_cuda(test: F) -> F:
    """Decorate a test that needs a CUDA GPU (see ``needs_cuda``)."""
    for mark in needs_cuda:
        test = mark(test)
    return test


def proves(*paths: GpuPath) -> pytest.MarkDecorator:
    """The ``gpu_path`` mark: the test, passing on a GPU, shows ``paths`` correct."""
    if not paths or not all(isinstance(p, GpuPath) for p in paths):
        raise TypeError("proves() takes one or more GpuPath members")
    return pytest.mark.gpu_path(*(p.value for p in paths))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test's ``gpu_path`` marks become junit properties: a GPU run's report then says which
    paths each passing test proved."""
    for item in items:
        for mark in item.iter_markers("gpu_path"):
            item.user_properties.extend(("gpu_path", value) for value in mark.args)
