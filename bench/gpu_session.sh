#!/usr/bin/env bash
# The GPU checks of fastpo in one command: parity tests on CUDA, the benchmark suite with results saved to
# bench/results/ (JSON + Markdown + PNG, with device, versions, date and command), and a per-kernel profile.
#
#   bash bench/gpu_session.sh fetch     on a machine with PyPI: wheels of what a bare GPU image lacks -> .whl/
#   bash bench/gpu_session.sh run [OUT] on the GPU machine (offline): install .whl/, test, benchmark; copies
#                                       logs and results to OUT (default bench/results)
#
# The GPU image is assumed to hold torch, triton, pytest and pytest-benchmark (Python 3.12); the wheels carry
# transformers (the version fastpo is tested with), datasets, liger-kernel, trl and cut-cross-entropy, without
# dependencies. Without matplotlib the results get no PNG (`python -m bench.report <json>` draws it later).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  "transformers==5.23.0" "datasets==5.2.0" "liger-kernel==0.8.5" "trl==1.16.0"
  "dill==0.4.1" "multiprocess==0.70.19" "cut-cross-entropy==25.1.1"
)

fetch() {
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
}

run() {
  local out="${1:-bench/results}"
  mkdir -p "$out"
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
  export PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu-env.txt"
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
  'transformers', transformers.__version__)" | tee -a "$out/gpu-env.txt"
  # 1. parity on CUDA: every test, the Triton kernels compiled for the device (no interpreter)
  python3 -m pytest -q -x tests/ 2>&1 | tee "$out/gpu-tests.log"
  # 2. benchmarks, every provider that installs, results written by --save-results
  python3 -m pytest -q bench/ --save-results 2>&1 | tee "$out/gpu-bench.log"
  # 3. where the time goes: per-kernel GPU time of each head path against the bare GEMMs
  for path in generic pair_fused reference; do
    python3 -m bench.profile_head --path "$path" --out "$out/gpu-profile.txt" 2>&1 | tail -20
  done
  cp bench/results/*.json bench/results/*.md bench/results/*.png "$out"/ 2>/dev/null || true
}

case "${1:-}" in
  fetch) fetch ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash bench/gpu_session.sh fetch | run [OUT]" >&2; exit 2 ;;
esac
