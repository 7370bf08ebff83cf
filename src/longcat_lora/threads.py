"""One thread per worker for the numeric libraries, set process-wide for a while and restored, shared by
overlapping users: torch's intra-op pool (when torch is loaded) and the BLAS under numpy (through
threadpoolctl)."""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Any

_THREADS = threading.Lock()
_users = 0  # callers inside single_threaded (their threads overlap)
_torch_before: int | None = None  # torch's setting before the first caller, once torch was limited
_blas: Any = None  # threadpoolctl's limiter, restoring the BLAS libraries' settings
_controller: Any = None  # threadpoolctl's view of the loaded BLAS libraries, made once (it scans them)


def _limit_blas() -> Any:
    """Limit the BLAS libraries numpy uses to one thread; the limiter that restores them, or None when
    that cannot be done (no threadpoolctl, or it fails on this system's libraries): only speed is lost."""
    global _controller
    try:
        from threadpoolctl import ThreadpoolController

        if _controller is None:
            _controller = ThreadpoolController()
        _release_openblas()
        try:
            return _controller.limit(limits=1, user_api="blas")
        finally:
            _release_openblas()
    except Exception:  # noqa: BLE001 - a speed setting must never fail the work
        return None


def _restore_blas(limiter: Any) -> None:
    try:
        _release_openblas()
        try:
            limiter.restore_original_limits()
        finally:
            _release_openblas()
    except Exception:  # noqa: BLE001 - as in _limit_blas
        pass


def _release_openblas() -> None:
    """threadpoolctl (3.6+) lets only the thread that last changed OpenBLAS's process-wide setting change it
    again, and silently ignores the others; our first and last users are often different threads (and
    act under our lock), so the claim is dropped around each change."""
    try:
        from threadpoolctl import OpenBLASController

        OpenBLASController.clear_controlling_thread(force=True)
    except (ImportError, AttributeError, TypeError):  # older threadpoolctl: no claim to drop
        pass


def _limit_torch() -> None:
    global _torch_before
    torch = sys.modules.get("torch")  # never imported here: callers that use torch have loaded it
    if torch is not None and _torch_before is None:
        _torch_before = torch.get_num_threads()
        torch.set_num_threads(1)


@contextmanager
def single_threaded():
    """Run torch and the BLAS under numpy on one thread inside: each calling thread computes its own
    operations. For many small operations (resize's r x r decompositions and thin Grams), where a thread
    pool costs more than it gains, and for work split over threads of our own (merge's row chunks,
    resize's modules), where a pool thread waiting for a busy core stalls every operation it shares (two
    numpy workers on a 2-core machine with OpenBLAS's own threads run 3-4x slower than one thread each).
    The settings are process-wide: the first caller in sets them, the last one out restores them."""
    global _users, _blas, _torch_before
    with _THREADS:
        if _users == 0:
            _blas = _limit_blas()
        _limit_torch()  # also when torch was loaded after the first caller came in
        _users += 1
    try:
        yield
    finally:
        with _THREADS:
            _users -= 1
            if _users == 0:
                if _torch_before is not None:
                    sys.modules["torch"].set_num_threads(_torch_before)
                    _torch_before = None
                if _blas is not None:
                    _restore_blas(_blas)
                    _blas = None


__all__ = ["single_threaded"]
