#!/bin/sh
# One short GPU check of the merge (about 3-5 minutes on one H100): the CUDA-vs-CPU tests, then
# benchmarks/merge.py on the same inputs with --device cpu and --device cuda. Needs torch (CUDA build),
# safetensors and numpy (pytest for the tests; no diffusers or peft). Run from the repository root:
#   sh benchmarks/gpu_check.sh [BLOCKS]        (default 12 full-width blocks: 6.8 GB base, ~21 GB of disk)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}
BLOCKS=${1:-12}
echo "== machine"; nvidia-smi -L 2>/dev/null; nproc; free -g | head -2; df -h "${TMPDIR:-/tmp}" | tail -1
$PY -c "import torch, safetensors, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')" || exit 1
echo "== tests (CUDA vs CPU; the staged path and the pipeline on the CPU)"
if $PY -c "import pytest" 2>/dev/null; then
    timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_merge_cuda.py \
        tests/test_merge.py -k "cuda or device or pipeline or nonfinite" -rs 2>&1 | tail -15
else
    echo "pytest is not installed: tests skipped"
fi
echo "== benchmark, $BLOCKS blocks, cpu then cuda on the same inputs"
timeout 330 $PY benchmarks/merge.py --blocks "$BLOCKS" --device cpu,cuda --pairs 2
