"""The threads that realise modules ahead of the writer: each planned module's output factors (`realise`
of every cell), computed on first use or by helper threads in the order the writer will ask for them."""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from .cells import ModulePlan, Workspace, realise, single_threaded

if TYPE_CHECKING:
    import numpy as np

    Factors = list[tuple[np.ndarray, np.ndarray]]  # per cell: (up, down), the output dtype's bytes


class Realised:
    """Each module's output factors, computed on first use, kept for the last two modules (the writer
    produces the next tensor on a second thread while it writes this one).

    After `follow(order)` (the modules in the order a writer asks for them), `AHEAD` helper threads
    compute the next modules while the current one is written, so both cores work. A guess that misses
    costs nothing but doing that module early: its result waits until asked for."""

    AHEAD = 2

    def __init__(self, dtype: str, keep: int = 2):
        self.dtype = dtype
        self.keep = keep
        self.cache: OrderedDict[str, Factors] = OrderedDict()
        self.errors: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        self.local = threading.local()  # each thread's Workspace
        self.order: list[ModulePlan] = []
        self.index: dict[str, int] = {}
        self.ahead: dict[str, Future] = {}
        self.pool: ThreadPoolExecutor | None = None
        self.threads: AbstractContextManager | None = None

    def follow(self, order: list[ModulePlan]) -> None:
        self.order = order
        self.index = {mp.name: i for i, mp in enumerate(order)}
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.AHEAD, thread_name_prefix="lowrank")

    def close(self) -> None:
        """Stop the helper threads (waiting for a module they are computing)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.threads is not None:
            self.threads.__exit__(None, None, None)
            self.threads = None

    def __enter__(self) -> Realised:
        # one BLAS thread per worker for the whole run: the setting is changed once, not per module
        self.threads = single_threaded()
        self.threads.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _compute(self, mp: ModulePlan) -> tuple[Factors, list[float]]:
        assert mp.plans is not None
        ws = getattr(self.local, "ws", None)
        if ws is None:
            ws = self.local.ws = Workspace()
        got, errs = [], []
        with single_threaded():
            for cell, plan in zip(mp.cells, mp.plans):
                up, down, err2 = realise(cell, plan, self.dtype, f"module {mp.name}", ws)
                got.append((up, down))
                errs.append(err2)
        return got, errs

    def get(self, mp: ModulePlan) -> Factors:
        with self.lock:
            got = self.cache.get(mp.name)
            if got is not None:
                self.cache.move_to_end(mp.name)
                return got
            fut = self.ahead.pop(mp.name, None)
            got, errs = fut.result() if fut is not None else self._compute(mp)
            self.errors[mp.name] = errs
            self.cache[mp.name] = got
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)
            self._look_ahead(mp)
            return got

    def _look_ahead(self, mp: ModulePlan) -> None:
        """Start the modules after `mp` (in the followed order) until AHEAD are in flight."""
        i = self.index.get(mp.name)
        if self.pool is None or i is None:
            return
        for nxt in self.order[i + 1:]:
            if len(self.ahead) >= self.AHEAD:
                return
            if nxt.name not in self.errors and nxt.name not in self.ahead:
                self.ahead[nxt.name] = self.pool.submit(self._compute, nxt)


__all__ = ["Realised"]
