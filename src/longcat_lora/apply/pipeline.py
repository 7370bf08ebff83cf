"""An ordered three-stage pipeline over a fixed list of jobs: load, compute, take.

A reader thread loads job i+1 (file reads release the GIL) while a compute thread computes job i
(torch releases the GIL) while the caller writes job i-1. Buffers live in `depth` slots: job i uses slot
i % depth; its input half is free again once job i is computed, its output half once the caller takes
job i+1 (so the caller must be done with job i's bytes by then). Memory is therefore bounded by `depth`
inputs and `depth` outputs, whatever the number of jobs. With depth 2 all three stages overlap.

Jobs run strictly in order in each stage. A failing stage stores the error on its job and stops; the
caller gets it when it takes that job (earlier jobs still come out normally), so errors surface in the
order a sequential run would raise them. `close()` stops both threads and waits for them (used on any
exit: error, Ctrl-C, SIGTERM raised in the main thread).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

import numpy as np

J = TypeVar("J")
J_contra = TypeVar("J_contra", contravariant=True)


class Stages(Protocol[J_contra]):
    """What one job goes through; `slot` names the buffers it uses (0 <= slot < depth)."""

    def load(self, job: J_contra, slot: int) -> None:
        """Reader thread: read the job's inputs into the slot."""

    def compute(self, job: J_contra, slot: int) -> None:
        """Compute thread: produce the slot's output; on return the slot's input may be overwritten."""

    def finish(self, job: J_contra, slot: int) -> np.ndarray:
        """Caller's thread: the job's output bytes (valid until the next job is taken)."""


class _Stopped(Exception):
    """The pipeline was closed while a stage waited (internal)."""


class Pipeline(Generic[J]):
    """Runs `stages` over `jobs` in order (see the module docstring); `take(i)` in increasing i."""

    def __init__(self, jobs: Sequence[J], stages: Stages[J], depth: int = 2):
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.jobs, self.stages, self.depth = list(jobs), stages, depth
        self._cv = threading.Condition()
        self._loaded = self._computed = self._released = 0  # jobs past each point
        self._taken = -1
        self._errors: dict[int, BaseException] = {}
        self._stop = False
        self._threads = [threading.Thread(target=self._run, args=(self._load,), name="merge-read", daemon=True),
                         threading.Thread(target=self._run, args=(self._compute,), name="merge-compute",
                                          daemon=True)]
        self._started = False

    # ------------------------------------------------------------------ caller side

    def take(self, i: int) -> np.ndarray:
        """Job i's output bytes; releases job i-1's output slot. Raises the error of job i's stages."""
        if i <= self._taken:
            raise RuntimeError(f"job {i} taken out of order (last taken {self._taken})")
        self._start()
        with self._cv:
            self._taken = i
            self._released = max(self._released, i)  # jobs < i are written: their outputs are free
            self._cv.notify_all()
            while self._computed <= i and i not in self._errors:
                self._cv.wait()
            if i in self._errors:
                raise self._errors[i]
        return self.stages.finish(self.jobs[i], i % self.depth)

    def close(self) -> None:
        """Stop both threads and wait for them (idempotent)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            if t.is_alive():
                t.join()

    def __enter__(self) -> Pipeline[J]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        if not self._started:
            self._started = True
            for t in self._threads:
                t.start()

    # ------------------------------------------------------------------ worker side

    def _wait(self, ready) -> None:
        """Wait (holding the lock) until ready() or closed."""
        while not (self._stop or ready()):
            self._cv.wait()
        if self._stop:
            raise _Stopped

    def _run(self, step) -> None:
        """Run `step(i)` for every job in order; the first error is stored on its job and ends the thread."""
        for i in range(len(self.jobs)):
            try:
                step(i)
            except _Stopped:
                return
            except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
                with self._cv:
                    self._errors.setdefault(i, e)
                    self._cv.notify_all()
                return

    def _load(self, i: int) -> None:
        with self._cv:  # job i-depth's input (same slot) must be consumed
            self._wait(lambda: self._computed > i - self.depth)
        self.stages.load(self.jobs[i], i % self.depth)
        with self._cv:
            self._loaded = i + 1
            self._cv.notify_all()

    def _compute(self, i: int) -> None:
        with self._cv:  # job i loaded (or failed), job i-depth's output (same slot) written
            self._wait(lambda: (self._loaded > i or i in self._errors) and self._released > i - self.depth)
            if i in self._errors:  # the reader failed on this job: nothing to compute, stop here
                raise _Stopped
        self.stages.compute(self.jobs[i], i % self.depth)
        with self._cv:
            self._computed = i + 1
            self._cv.notify_all()


__all__ = ["Pipeline", "Stages"]
