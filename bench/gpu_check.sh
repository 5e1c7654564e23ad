#!/usr/bin/env bash
# One-shot GPU check for the reclm ops, sized for the first lent GPU: one call,
# under ten minutes in all (each stage has its own timeout). Run from the repo
# root on a machine with a CUDA GPU and a CUDA build of torch:
#     bash bench/gpu_check.sh
# 1. builds the extension (CPU + CUDA sources) into a fresh cache, for this
#    GPU's architecture only;
# 2. runs tests/test_ops.py (the CUDA tests included: spmm vs dense, gradients,
#    checks, opcheck; top-K vs the reference with ties, subsets, exclusions);
# 3. runs the GPU bench: spmm vs torch.sparse.mm (cuSPARSE), top-K vs the
#    blocked torch top-K on GPU, printed as a markdown table;
# 4. bench/gpu_llm_bench.py: an 03, 04 and 05 step and 06's prefill and decode
#    at Llama-2-7B's and Qwen2.5-7B's sizes (LLM_BENCH=0 skips it; it needs
#    transformers and peft only, which the lent machines have).
# Exit status: non-zero if the build or a test failed (the bench still runs
# after failed tests, so one call gives both).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(command -v python || command -v python3)}
export RECLM_CACHE=${RECLM_CACHE:-/tmp/reclm_gpu_cache}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export MAX_JOBS=${MAX_JOBS:-8}
start=$(date +%s)
$PY -c 'import torch; assert torch.cuda.is_available(), "no GPU"; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())' || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
echo "== build (arch $TORCH_CUDA_ARCH_LIST)"
if ! RECLM_VERBOSE=1 timeout 240 $PY -c 'from csrc.ops import load_extension; load_extension()' > /tmp/reclm_gpu_build.log 2>&1; then
  tail -40 /tmp/reclm_gpu_build.log; echo "BUILD FAILED"; exit 1
fi
grep -iE "warning|error" /tmp/reclm_gpu_build.log | head -20
echo "== tests ($(( $(date +%s) - start )) s so far)"
# -v and the whole log kept: a crash (segfault) then names the test it happened in;
# with pytest-xdist, a crash ends only its worker and the other tests still run.
workers=$($PY -c 'import xdist' 2>/dev/null && echo "-n 4")
timeout 150 $PY -X faulthandler -m pytest tests/test_ops.py -v -rs -p no:cacheprovider $workers \
  > /tmp/reclm_gpu_tests.log 2>&1
test_rc=$?
grep -E "PASSED|FAILED|ERROR|SKIPPED" /tmp/reclm_gpu_tests.log | grep -v PASSED | head -30
grep -A14 "Fatal Python error" /tmp/reclm_gpu_tests.log | head -30
tail -3 /tmp/reclm_gpu_tests.log
echo "== bench ($(( $(date +%s) - start )) s so far)"
timeout 180 $PY -m bench.bench_ops --device cuda --reps 7 --topk-users 16384 2>&1 | grep -v Warning
if [ "${LLM_BENCH:-1}" = 1 ]; then  # 4. each LLM stage's unit of work at 7B, random weights from the configs
  echo "== LLM units at 7B ($(( $(date +%s) - start )) s so far)"
  timeout 200 $PY -m bench.gpu_llm_bench ${LLM_BENCH_ARGS:-} 2>&1 | grep -vE "Warning|warn"
fi
echo "== done in $(( $(date +%s) - start )) s; tests exit status $test_rc"
exit $test_rc
