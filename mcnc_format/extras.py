"""Optional dependencies, and the error that says which extra installs one.

``pip install mcnc-format`` brings the format, the engine, the CLI and the Hub; the
integrations with transformers and PEFT need those libraries, installed by the extras
``[transformers]``, ``[peft]`` or ``[all]`` (pyproject.toml). An integration calls
``require`` before it imports its library, so a missing one is a ``UsageError`` that names
the command to run instead of a ``ModuleNotFoundError`` from deep inside.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UsageError

__all__ = ["require"]


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``module`` imported, or a ``UsageError`` saying that ``feature`` needs the extra
    ``extra``. A module that is installed but fails to import raises its own error."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module.partition(".")[0]:
            raise
        raise UsageError(f"{feature} needs {module}, which is not installed: "
                         f"pip install 'mcnc-format[{extra}]'") from exc
