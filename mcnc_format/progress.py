"""``progress=True``: a rich progress bar on stderr while tensors are rebuilt.

The engine reports a ``Progress`` after each tensor to a callable (``LoadOptions.progress``);
``progress=True`` given to ``load``, ``stream``, ``load_into`` or ``MCNCFile`` becomes a
``ProgressBar`` here, and ``mcnc unpack`` and ``mcnc verify`` show the same bar. It shows
tensors, bytes, chunks regenerated and the rate, on a terminal only: piped or redirected
output, notebooks' captured streams and CI logs get nothing.

Why drawn on each report rather than by rich's refresh thread: the bar belongs to a load that
a caller may abandon (a ``stream`` left half-read); with no thread there is nothing left
running, and a bar whose load ended early is closed when the next load starts or when the
bar is collected.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress

from .cli.safe_text import printable
from .engine.options import Progress
from .errors import UsageError

__all__ = ["ProgressBar", "progress_callback"]

ProgressCallback = Callable[[Progress], None]


class ProgressBar:
    """A ``Progress`` callback that draws one bar per load on ``console`` (stderr by default)
    when it is a terminal, and nothing otherwise. ``description`` is shown before the tensor's
    name."""

    def __init__(self, description: str = "loading", console: Console | None = None) -> None:
        self.description = description
        self.console = console or Console(stderr=True)
        self._display: RichProgress | None = None
        self._task: TaskID | None = None
        self._closer: weakref.finalize | None = None  # type: ignore[type-arg]

    def __call__(self, progress: Progress) -> None:
        if not self.console.is_terminal:
            return
        if self._display is None or progress.tensors_done == 1:  # a new load
            self._start()
        assert self._display is not None and self._task is not None
        tensors = f"{progress.tensors_done:,}/{progress.tensors_total:,}"
        self._display.update(
            self._task, total=max(progress.bytes_total, 1), completed=progress.bytes_done,
            name=printable(progress.name), tensors=tensors,
            chunks=f"{progress.chunks_regenerated:,}")
        self._display.refresh()
        if progress.tensors_done >= progress.tensors_total:
            self.close()

    @property
    def active(self) -> bool:
        """Whether a bar is on the terminal now (a load is running, or ended early)."""
        return self._display is not None

    def _start(self) -> None:
        self.close()
        display = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[tensors]} tensors"),
            DownloadColumn(binary_units=True),
            TextColumn("{task.fields[chunks]} chunks"),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[name]}", markup=False, style="dim"),
            console=self.console, auto_refresh=False, transient=True,
            redirect_stdout=False, redirect_stderr=False)
        self._task = display.add_task(self.description, total=None, name="", tensors="",
                                      chunks="0")
        display.start()
        self._display = display
        self._closer = weakref.finalize(self, display.stop)

    def close(self) -> None:
        """Take the bar off the terminal (the next report starts a new one)."""
        if self._closer is not None:
            self._closer()
        self._display = self._task = self._closer = None


def progress_callback(value: bool | ProgressCallback | None, description: str = "loading"
                      ) -> ProgressCallback | None:
    """What a ``progress=`` keyword means: ``True`` a ``ProgressBar``, ``False`` or ``None``
    nothing, a callable itself."""
    if value is None or value is False:
        return None
    if value is True:
        return ProgressBar(description)
    if not callable(value):
        raise UsageError(f"progress={value!r}: give True, False or a callable that takes a "
                         "mcnc_format.Progress")
    return value
