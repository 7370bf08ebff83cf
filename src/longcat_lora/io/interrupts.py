"""SIGTERM handled like Ctrl-C, and short critical sections that a signal must not split.

`timeout`, `docker stop` and job schedulers stop a process with SIGTERM, whose default action kills it
on the spot and leaves a partial temp file. The CLI runs under `handle_signals()`: SIGTERM raises
`Terminated` in the main thread wherever it is, so every `atomic_output` block removes its temp file or
directory on the way out exactly as it does for KeyboardInterrupt (SIGINT). Inside `critical()` (putting
an output in place, removing a temp) SIGINT and SIGTERM are held and raised when the section ends, so a
signal never leaves the rename of a directory half done.

Only the main thread receives Python signal handlers; library callers that never enter
`handle_signals()` keep whatever handlers they installed.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (not an Exception: like KeyboardInterrupt)."""


class _State:
    depth = 0  # nesting of critical() in the main thread
    pending: int | None = None  # a signal that arrived inside a critical section


def _raise_for(signum: int) -> None:
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt


def _handler(signum: int, frame: FrameType | None) -> None:
    if _State.depth > 0:
        _State.pending = signum
        return
    _raise_for(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def handle_signals() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated and SIGINT KeyboardInterrupt (both deferred in critical()).

    A signal the process was started with ignored (SIG_IGN, e.g. SIGINT for a `&` job) stays ignored.
    The previous handlers are restored on exit.
    """
    if not _main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    for s, h in old.items():
        if h is not signal.SIG_IGN:
            signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _State.pending = None


@contextmanager
def critical() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (when handle_signals() is active) until the block ends, then raise for them."""
    if not _main_thread():
        yield
        return
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        if _State.depth == 0 and _State.pending is not None:
            signum, _State.pending = _State.pending, None
            _raise_for(signum)


__all__ = ["Terminated", "critical", "handle_signals"]
