#!/usr/bin/env bash
# fastpo's GPU checks in one command that fits a short lease: `python -m bench.session` runs five stages in
# order of value (kernel parity, the LM head against the bare GEMMs, the fused DPO loss against Liger and TRL,
# a train step against a TRL-style padded step, the prefix-shared attention backends), each in its own process
# under a wall-clock cap, in at most 8 minutes in all, this script's installs included. Each stage writes
# OUT/<n>-<stage>.json as it goes and OUT/summary.md is rewritten after each one; this script adds
# OUT/session.log. Every file records the device, the versions, the date and the exact command.
#
#   bash bench/gpu_session.sh fetch          (where PyPI is reachable) wheels the GPU image lacks -> .whl/,
#                                            at most 40 MiB in all (checked: the tree a device call carries
#                                            is capped at 64 MiB)
#   bash bench/gpu_session.sh check-wheels   the size check alone
#   bash bench/gpu_session.sh run OUT [...]  on the GPU machine (offline): install .whl/ and fastpo, run the
#                                            stages (extra arguments go to `python -m bench.session run`,
#                                            e.g. --only head dpo)
#   bash bench/gpu_session.sh dry-run [OUT]  anywhere, no install: the same stages and code at tiny shapes
#                                            (CPU: Triton interpreter), well under a minute; CI runs it
#   bash bench/gpu_session.sh plan           what each stage of `run` would do, with its cap
#
# Wheels: the GPU image has torch, triton, pytest, peft, accelerate, pandas and pyarrow, and transformers 5.17;
# it lacks liger-kernel, trl and cut-cross-entropy. transformers is carried at the version the CPU suite
# passes with, since fastpo's prefix-shared attention and its packed-mask shortcut use transformers'
# attention and masking interfaces, which moved between 5.x releases; the image's huggingface-hub,
# tokenizers and safetensors satisfy it. Not carried: datasets (+ dill, multiprocess), which no stage imports
# (fastpo.data loads it only to read a dataset), peft (on the image; Liger imports it only if present), and
# nvidia-cutlass-dsl (Liger's SM90 scaled-CE kernel needs it, but its CUDA library wheel alone is 92 MB:
# the head stage skips `liger-scaled-ce` on SM90 without it and times Liger's Triton FLCE instead).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

WHEELS=("transformers==5.24.0" "liger-kernel==0.8.5" "trl==1.16.0" "cut-cross-entropy==25.1.1")
MAX_WHEELS_MIB=40

check_wheels() {
  local dir="${1:-.whl}" total=0 size f
  compgen -G "$dir/*.whl" >/dev/null || { echo "ERROR: no wheels in $dir" >&2; return 1; }
  for f in "$dir"/*.whl; do
    size=$(stat -c %s "$f")
    total=$((total + size))
    awk -v s="$size" -v n="$(basename "$f")" 'BEGIN { printf "%8.2f MiB  %s\n", s / 1048576, n }'
  done
  awk -v s="$total" -v m="$MAX_WHEELS_MIB" 'BEGIN { printf "%8.2f MiB  in all (limit %d MiB)\n", s / 1048576, m }'
  if ((total > MAX_WHEELS_MIB * 1048576)); then
    echo "ERROR: the wheels in $dir take more than $MAX_WHEELS_MIB MiB; a device call carries at most 64 MiB" >&2
    return 1
  fi
}

fetch() {
  local tmp
  tmp=$(mktemp -d)
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$tmp" "${WHEELS[@]}" || { rm -rf "$tmp"; return 1; }
  check_wheels "$tmp" || { rm -rf "$tmp"; return 1; }
  chmod 755 "$tmp" && rm -rf .whl && mv "$tmp" .whl # one version of each: two would stop the install there
}

install() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    check_wheels .whl >/dev/null || return 1
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || return 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e . || return 1
}

session() {
  local cmd="$1" out="$2"
  shift 2
  export FASTPO_SESSION_COMMAND="bash bench/gpu_session.sh $cmd $out${*:+ $*}" PYTHONUNBUFFERED=1
  if [[ "$cmd" == run ]]; then
    install || return 1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  fi
  "$PYTHON" -m bench.session "$cmd" "$out" "$@"
}

case "${1:-}" in
  fetch) fetch ;;
  check-wheels) check_wheels "${2:-.whl}" ;;
  plan) "$PYTHON" -m bench.session plan ;;
  run | dry-run)
    cmd="$1"
    out="${2:-}"
    if [[ -z "$out" && "$cmd" == run ]]; then
      echo "usage: bash bench/gpu_session.sh run OUT [ARGS]" >&2
      exit 2
    fi
    [[ -n "$out" ]] || out=$(mktemp -d)
    mkdir -p "$out"
    shift $(($# < 2 ? $# : 2))
    export FASTPO_SESSION_T0="${FASTPO_SESSION_T0:-$(date +%s)}" # the 8-minute budget counts the installs
    session "$cmd" "$out" "$@" 2>&1 | tee "$out/session.log"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh fetch | check-wheels [DIR] | run OUT [ARGS] | dry-run [OUT] | plan" >&2
    exit 2
    ;;
esac
