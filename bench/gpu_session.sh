#!/usr/bin/env bash
# One device call: GPU tests, kernel benchmark, training benchmark. Usage (on the device, repo root):
#   bash bench/gpu_session.sh [tests|kernels|train|generate|all] [extra args for train_speed.py / generate_speed.py]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src:${PYTHONPATH:-}
what=${1:-all}; shift || true
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
if [[ $what == tests || $what == all ]]; then
  timeout 500 python3 -m pytest -m gpu -q -p no:cacheprovider --durations=15 tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [[ $what == kernels || $what == all ]]; then
  timeout 200 python3 bench/kernels_ops.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -40
fi
if [[ $what == train || $what == all ]]; then
  timeout 420 python3 bench/train_speed.py --out "$OUT/train.json" "$@" 2>&1 | tee "$OUT/train.log" | tail -40
fi
if [[ $what == generate ]]; then  # not in "all": with its transformers baselines it takes most of a device call
  timeout 580 python3 bench/generate_speed.py --out "$OUT/generate_speed.json" "$@" 2>&1 | tee "$OUT/generate.log" | tail -40
fi
