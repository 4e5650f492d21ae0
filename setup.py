"""Builds the optional compiled Philox kernels (``mcnc_format/_philox.c``, SPEC.md §8).

Everything else about the package is in pyproject.toml. The extension is optional: where it
does not compile (no compiler, an unsupported platform), the install goes on with a warning and
``mcnc_format.philox`` uses its NumPy path, which gives the same words and uniform values.
Built and tested on Linux x86-64 with GCC; the flags below are meant for GCC and Clang on
Linux, macOS (x86-64, arm64) and aarch64, and for MSVC, but only Linux x86-64 is tested.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """A ``build_ext`` whose failure is a warning: the pure path serves without it."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:
            self._skip(error)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as error:
            self._skip(error)

    def _skip(self, error: Exception) -> None:
        message = (f"WARNING: mcnc_format's compiled Philox kernels were not built ({error}); "
                   "the NumPy path is used instead (same values, several times slower)")
        self.warn(message)
        print(message, file=sys.stderr)


if sys.platform == "win32":
    COMPILE_ARGS = ["/O2", "/fp:precise"]
else:
    # No fused multiply-add contraction: the uniform values are exact IEEE products (§8.2).
    COMPILE_ARGS = ["-O3", "-ffp-contract=off", "-fno-strict-aliasing"]

setup(
    ext_modules=[Extension("mcnc_format._philox", ["mcnc_format/_philox.c"],
                           extra_compile_args=COMPILE_ARGS, optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
