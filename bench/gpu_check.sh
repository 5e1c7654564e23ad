#!/usr/bin/env bash
# One-shot GPU check for the reclm ops (the CUDA sources were only compiled,
# never run, in the session that wrote them). Run from the repo root on a
# machine with a CUDA GPU and a CUDA build of torch:  bash bench/gpu_check.sh
# Builds into a fresh cache, runs the CUDA tests, then the benchmark on GPU
# (spmm vs torch.sparse.mm / cuSPARSE, top-K vs the blocked torch reference).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export RECLM_CACHE=${RECLM_CACHE:-/tmp/reclm_gpu_cache}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export MAX_JOBS=${MAX_JOBS:-8}
$PY -c 'import torch; assert torch.cuda.is_available(), "no GPU"; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# Build once (prints compiler errors if any), then the tests (CUDA ones included).
RECLM_VERBOSE=1 $PY -c 'from csrc.ops import load_extension; load_extension()' 2>&1 | tail -5
$PY -m pytest tests/test_ops.py -q -x 2>&1 | tail -15
timeout 420 $PY bench/bench_ops.py --device cuda --reps 5 --topk-users 16384 2>&1 | grep -v Warning
