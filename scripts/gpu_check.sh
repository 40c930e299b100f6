#!/usr/bin/env bash
# One device check: the gpu-marked tests, then the GPU bench workload (serial vs pipeline vs DataLoader),
# printed as a short table. On a machine without CUDA it says so and exits 0.
# Usage: bash scripts/gpu_check.sh [OUTDIR]    (OUTDIR gets bench-gpu.json and gpu-check.log)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp}}
mkdir -p "$out"
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
if ! "$py" -c "import pipeline, torch" 2>/dev/null; then
  "$py" -m pip install -q -e '.[test]' || { echo "gpu_check: cannot install the project"; exit 1; }
fi
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to check."
  exit 0
fi
export PYTHONUNBUFFERED=1
"$py" -m pipeline devices | tee "$out/gpu-check.log"
echo "== gpu-marked tests"
timeout 300 "$py" -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee -a "$out/gpu-check.log" | tail -n 15
tests_rc=${PIPESTATUS[0]}
echo "== bench: configs/bench-gpu.toml (serial vs pipeline vs DataLoader)"
timeout 240 "$py" -m pipeline bench --config configs/bench-gpu.toml --batches 48 \
  --modes serial,pipeline,DataLoader --workers-list 1,2,4 --json "$out/bench-gpu.json" 2>&1 \
  | tee -a "$out/gpu-check.log"
bench_rc=${PIPESTATUS[0]}
echo "== summary: gpu tests exit $tests_rc, bench exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
