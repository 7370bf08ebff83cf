"""torch's intra-op thread count, set process-wide for a while and restored, shared by overlapping users."""

from __future__ import annotations

import threading
from contextlib import contextmanager

_THREADS = threading.Lock()
_users = 0  # callers inside single_threaded (their threads overlap), and torch's setting before
_before = 0


@contextmanager
def single_threaded():
    """Run torch on one thread inside: each calling thread computes its own operations. For many small
    operations (resize's r x r SVDs and thin Grams), where torch's pool costs more than it gains, and for
    work split over threads of our own (merge's row chunks), where a pool thread waiting for a busy core
    stalls every operation it shares. torch's setting is process-wide: the first caller in sets it, the
    last one out restores it."""
    import torch

    global _users, _before
    with _THREADS:
        if _users == 0:
            _before = torch.get_num_threads()
            torch.set_num_threads(1)
        _users += 1
    try:
        yield
    finally:
        with _THREADS:
            _users -= 1
            if _users == 0:
                torch.set_num_threads(_before)


__all__ = ["single_threaded"]
