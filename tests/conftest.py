from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from longcat_lora.testing.fixtures import write_native_lora
from longcat_lora.model.naming import DitDims

# Full structure (48 blocks, every module type), small widths so the suite stays fast.
DIMS = DitDims(hidden=64, ffn=176, adaln=32, final_out=16, depth=48)


def cli(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    p = subprocess.run([sys.executable, "-m", "longcat_lora", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


@pytest.fixture
def native(tmp_path):
    """Factory: write a full-structure native LoRA and return its path."""

    def make(layout: str = "refinement", name: str | None = None, **kw) -> str:
        kw.setdefault("dims", DIMS)
        kw.setdefault("rank", 4)
        kw.setdefault("dtype", torch.float32)
        path = tmp_path / (name or f"{layout}.safetensors")
        return write_native_lora(str(path), layout, **kw)

    return make
