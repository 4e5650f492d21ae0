"""The checkpoint layouts mcnc-format reads, one converter plug-in per layout.

This folder sits at the top of the source tree (beside ``mcnc_format/``, ``spec/`` and
``tests/``) and is installed as ``mcnc_format.layouts`` (pyproject's ``package-dir``; a
top-level package named ``converters`` would clash in site-packages). Each module reads one
layout that training stacks write and says so in its docstring; the plug-ins register under
the entry-point group ``mcnc_format.converters`` like any third-party converter, and share
the machinery of ``mcnc_format.converters`` (``layout.py``, ``lazy.py``). README.md has the
table of layouts, tools and commands.
"""
