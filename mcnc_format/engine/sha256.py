"""SHA-256 of a base tensor computed from its bytes as they are read, on worker threads.

A base checkpoint's pin (SPEC.md §7.4, R75) covers a whole tensor. When a load reads the
whole tensor anyway, its bytes are hashed as they pass through the buffer they are read into
(a staging slot, or the output itself on the CPU): no second read, and nothing held beyond
that buffer. SHA-256 is sequential within a tensor, so a tensor's pieces are hashed in order
by one task at a time; tensors hash in parallel on the pool, and hashing a piece overlaps
reading the next one. ``hashlib`` releases the GIL on large updates.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, InvalidStateError

from ..errors import MCNCError

__all__ = ["StreamHash"]


class StreamHash:
    """SHA-256 of ``nbytes`` fed in order. ``feed`` returns a future done once that piece is
    hashed (its buffer must not change before); when all ``nbytes`` are in, ``finish`` gets
    the hex digest on a worker, and ``verdict`` holds its outcome (what it raised, if
    anything). ``aborted`` is called when the read stops short."""

    def __init__(self, pool: Executor, nbytes: int, finish: Callable[[str], None],
                 aborted: Callable[[], None] | None = None) -> None:
        self._pool = pool
        self._aborted = aborted
        self._left = nbytes
        self._finish = finish
        self._digest = hashlib.sha256()
        self._queue: deque[tuple[memoryview, Future[None]]] = deque()
        self._lock = threading.Lock()
        self._running = False
        self.verdict: Future[None] = Future()

    def feed(self, data: memoryview) -> Future[None]:
        """Hash ``data`` after the pieces fed before it."""
        done: Future[None] = Future()
        with self._lock:
            self._queue.append((data, done))
            if self._running:
                return done
            self._running = True
        self._pool.submit(self._drain)
        return done

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    return
                data, done = self._queue.popleft()
            self._digest.update(data)  # a memoryview of plain bytes: nothing to raise
            done.set_result(None)
            self._left -= len(data)
            if self._left == 0:
                self._judge()

    def _judge(self) -> None:
        try:
            self._finish(self._digest.hexdigest())
        except BaseException as exc:  # handed to whoever awaits the verdict
            outcome: BaseException | None = exc
        else:
            outcome = None
        with contextlib.suppress(InvalidStateError):  # unless aborted meanwhile
            if outcome is None:
                self.verdict.set_result(None)
            else:
                self.verdict.set_exception(outcome)

    def abort(self) -> None:
        """The read failed: hash nothing more; the verdict says so to anyone waiting."""
        with self._lock:
            for _, done in self._queue:
                done.set_result(None)
            self._queue.clear()
        with contextlib.suppress(InvalidStateError):  # unless all was hashed and judged
            self.verdict.set_exception(MCNCError("the read of the base tensor failed before "
                                                 "all of its bytes were hashed"))
        if self._aborted is not None:
            self._aborted()
