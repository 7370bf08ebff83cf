"""The CPU merge shares each weight's row chunks among threads of its own (torch single-threaded in each).

Checked: the bytes do not depend on how many workers there are or which one takes which chunk (every
chunk is the same operations in the same order); the chunks really are shared; an error in any chunk
fails the merge with nothing written and no thread left; torch's thread count is what it was, after a
merge and after a failed one, and other work keeps torch's pool (only computing runs single-threaded).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest
import torch

import longcat_lora as L
from longcat_lora.apply import merge, merge_compute as mc
from longcat_lora.testing.dit import TINY
from longcat_lora.testing.fixtures import write_base_checkpoint, write_native_lora


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("workers")
    base = write_base_checkpoint(str(d / "base"), TINY, "longcat", shards=2, dtype=torch.bfloat16)
    lora = write_native_lora(str(d / "l.safetensors"), "refinement", dims=TINY.dims, rank=4, dtype=torch.float32,
                             alpha_scale=0.5, seed=3)
    return base, lora


def _digest(folder) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))}


def _workers(monkeypatch, n: int) -> None:
    monkeypatch.setattr(merge, "_stages", lambda jobs, device: mc.CpuStages(merge.DEPTH, workers=n))


def test_bytes_do_not_depend_on_the_workers_and_chunks_are_shared(inputs, tmp_path, monkeypatch):
    base, lora = inputs
    monkeypatch.setattr(mc, "CHUNK_ELEMENTS", 3 * TINY.dims.hidden)  # a few rows a chunk: many chunks
    who: list[str] = []
    real = mc.nonfinite

    def noting(raw, dtype):  # called once per chunk, by the worker that computed it
        who.append(threading.current_thread().name)
        if len(who) < 60:
            time.sleep(0.002)  # long enough that a worker alone cannot take every chunk
        return real(raw, dtype)

    monkeypatch.setattr(mc, "nonfinite", noting)
    digests = {}
    for n in (1, 3):
        _workers(monkeypatch, n)
        who.clear()
        out = tmp_path / f"w{n}"
        L.merge_checkpoint(base, str(out), [(lora, 0.9)], device="cpu")
        digests[n] = _digest(out)
        names = set(who)
        if n == 1:
            assert len(names) == 1 and not any(x.startswith("merge-chunk") for x in names)
        else:
            assert len(who) > 30 and len(names) >= 2 and all(x.startswith("merge-chunk") for x in names)
    assert digests[1] == digests[3]


def test_an_error_in_one_chunk_fails_the_merge_with_nothing_left(inputs, tmp_path, monkeypatch):
    base, lora = inputs
    _workers(monkeypatch, 3)
    monkeypatch.setattr(mc, "CHUNK_ELEMENTS", 3 * TINY.dims.hidden)
    before = torch.get_num_threads()
    seen = []
    real = mc.nonfinite

    def poisoned(raw, dtype):
        seen.append(1)
        return len(seen) == 7 or real(raw, dtype)  # the 7th chunk "finds" a NaN

    monkeypatch.setattr(mc, "nonfinite", poisoned)
    out = tmp_path / "o"
    with pytest.raises(L.LoraError, match="merging gives non-finite values"):
        L.merge_checkpoint(base, str(out), [(lora, 1.0)], device="cpu")
    assert os.listdir(tmp_path) == []
    assert [t.name for t in threading.enumerate() if t.name.startswith("merge-")] == []
    assert torch.get_num_threads() == before


def test_torch_keeps_its_pool_outside_the_computing(inputs, tmp_path, monkeypatch):
    base, lora = inputs
    before = torch.get_num_threads()
    seen_in_compute, seen_in_load = [], []
    compute, load = mc.CpuStages.compute, mc.CpuStages.load

    def watch_compute(self, job, slot):
        real = mc.nonfinite

        def inside(raw, dtype):
            seen_in_compute.append(torch.get_num_threads())
            return real(raw, dtype)

        monkeypatch.setattr(mc, "nonfinite", inside)
        return compute(self, job, slot)

    def watch_load(self, job, slot):
        seen_in_load.append(torch.get_num_threads())
        return load(self, job, slot)

    monkeypatch.setattr(mc.CpuStages, "compute", watch_compute)
    monkeypatch.setattr(mc.CpuStages, "load", watch_load)
    L.merge_checkpoint(base, str(tmp_path / "o"), [(lora, 1.0)], device="cpu")
    assert set(seen_in_compute) == {1}
    assert torch.get_num_threads() == before
    if before > 1:  # where torch has a pool at all: reading and loading factors keep it
        assert before in seen_in_load


def test_the_first_failing_chunk_names_the_error_whichever_worker_fails_first(inputs, tmp_path, monkeypatch):
    """Chunk 9 fails at once, chunk 5 a little later: the error is chunk 5's, as a sequential run gives."""
    base, lora = inputs
    _workers(monkeypatch, 3)
    lcm = 704  # every adapted weight's width (64 or 176) divides it: all full chunks have one size
    assert lcm % TINY.dims.hidden == 0 and lcm % TINY.dims.ffn == 0
    monkeypatch.setattr(mc, "CHUNK_ELEMENTS", lcm)
    full = lcm * 2  # bytes of a full bf16 chunk
    real = mc.nonfinite
    nine_failed = threading.Event()

    def poisoned(raw, dtype):
        if raw.nbytes == full:
            idx = (raw.ctypes.data - raw.base.ctypes.data) // full
            if idx == 9:
                nine_failed.set()
                raise RuntimeError("chunk 9")
            if idx == 5:
                nine_failed.wait(2.0)  # fail after chunk 9 did
                raise RuntimeError("chunk 5")
        return real(raw, dtype)

    monkeypatch.setattr(mc, "nonfinite", poisoned)
    for _ in range(4):  # which worker takes which chunk varies from run to run
        nine_failed.clear()
        with pytest.raises(RuntimeError, match="^chunk 5$"):
            L.merge_checkpoint(base, str(tmp_path / "o"), [(lora, 1.0)], device="cpu")
        assert nine_failed.is_set() and os.listdir(tmp_path) == []
