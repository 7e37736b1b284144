#!/usr/bin/env bash
# One prepared device check for the torch engine: the CUDA tests, then the DP-SGD step bench
# on CUDA. Run from the repository root on a machine with an NVIDIA GPU:
#
#     bash benches/gpu/run_gpu.sh            # results in ${OUT:-benches/results}
#
# It needs a Python with confide (built), torch (CUDA wheel), pytest and optionally opacus:
# PYTHON=/path/to/python overrides the default (.venv/bin/python, else python3). Without a
# CUDA device it says so and exits 0, so it is safe to run anywhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUT="${OUT:-benches/results}"
mkdir -p "$OUT"

if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "run_gpu.sh: no CUDA device visible to $PYTHON (or torch missing); nothing to run."
    exit 0
fi
"$PYTHON" -c 'import torch; print("CUDA:", torch.cuda.get_device_name(), "torch", torch.__version__)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 1. The CUDA tests (they skip without a GPU elsewhere; here they must run).
status=0
"$PYTHON" -m pytest -q -p no:cacheprovider -k cuda -rs \
    tests/training/test_torch_engine.py tests/privacy/test_torch_clip.py \
    2>&1 | tee "$OUT/gpu_tests.txt" || status=$?

# 2. The bench on CUDA (all CPU threads for the host side), with a time budget.
timeout "${BENCH_TIMEOUT:-420}" "$PYTHON" benches/gpu/bench_gpu.py --json "$OUT/torch_dpsgd_cuda.json" \
    2>&1 | tee "$OUT/gpu_bench.txt" || status=$?
exit $status
