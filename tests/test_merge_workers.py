"""The CPU merge shares each weight's row chunks among threads of its own (torch single-threaded in each).

Checked: the bytes do not depend on how many workers there are or which one takes which chunk (every
element is correctly rounded); the chunks really are shared; an error in any chunk
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
from longcat_lora.apply.exact import ExactMerge, NotFinite
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
    real = ExactMerge.chunk

    def noting(self, *a, **k):  # called once per chunk, by the worker that computes it
        who.append(threading.current_thread().name)
        if len(who) < 60:
            time.sleep(0.002)  # long enough that a worker alone cannot take every chunk
        return real(self, *a, **k)

    monkeypatch.setattr(ExactMerge, "chunk", noting)
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
    real = ExactMerge.chunk

    def poisoned(self, *a, **k):
        seen.append(1)
        if len(seen) == 7:  # the 7th chunk "finds" a value its dtype cannot hold
            raise NotFinite
        return real(self, *a, **k)

    monkeypatch.setattr(ExactMerge, "chunk", poisoned)
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

    real = ExactMerge.chunk

    def inside(self, *a, **k):
        seen_in_compute.append(torch.get_num_threads())
        return real(self, *a, **k)

    monkeypatch.setattr(ExactMerge, "chunk", inside)

    def watch_compute(self, job, slot):
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
    monkeypatch.setattr(mc, "CHUNK_ELEMENTS", 2 * TINY.dims.hidden)  # two rows a chunk of a hidden-wide weight
    real = ExactMerge.chunk
    nine_failed = threading.Event()

    def poisoned(self, w64, r0, r1, *a, **k):
        if self.cols == TINY.dims.hidden and self.rows >= 40:  # the first weight of that width: fail its chunks
            idx = r0 // 2
            if idx == 9:
                nine_failed.set()
                raise RuntimeError("chunk 9")
            if idx == 5:
                nine_failed.wait(2.0)  # fail after chunk 9 did
                raise RuntimeError("chunk 5")
        return real(self, w64, r0, r1, *a, **k)

    monkeypatch.setattr(ExactMerge, "chunk", poisoned)
    for _ in range(4):  # which worker takes which chunk varies from run to run
        nine_failed.clear()
        with pytest.raises(RuntimeError, match="^chunk 5$"):
            L.merge_checkpoint(base, str(tmp_path / "o"), [(lora, 1.0)], device="cpu")
        assert nine_failed.is_set() and os.listdir(tmp_path) == []
