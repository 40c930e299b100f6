#!/usr/bin/env bash
# Everything that needs a GPU, in one go (about 8 minutes on one H100 with 16 cores):
#   1. bench-gpu: serial, pipeline, DataLoader, mp.Pool at 1, 2, 4, 8 workers
#   2. the whole test suite (gpu-marked tests included), with pytest-xdist when it is installed
#   3. the default job (`run --workers 4`) against serial
#   4. file input: 64 x 64 MB .npy on the GPU, serial vs pipeline vs DataLoader at 4 workers
#   5. bench-handoff at 2, 8, 16 workers (when there are 16 cores)
#   6. your own data: a JPEG dataset through the pipeline, DataLoader and SPDL (when installed)
#   7. images: the CUDA decode test (nvJPEG), bench-images and bench-images-resnet (resnet50, bf16)
#   8. lesson 09's facts about tensors crossing processes (docs/gpu-facts/)
#   0. first: the gpu tests of samples of their own length and of text (a real OOM split, bf16), and
#      bench-seq / bench-text on CUDA (text needs the [text] extra: carry its wheels); then --trace and
#      the verdict on CUDA (the H2D-bound test, a traced run with NVML when nvidia-ml-py is there, the
#      cost of tracing at 4 workers)
# then a short table (scripts/gpu_summary.py). Each step writes its JSON/log to OUTDIR as it finishes,
# so a step that runs out of time leaves the others' results. bench-gpu also runs the ray and ray.data
# modes when Ray Data is installed (pip install -e '.[ray]').
# On a machine without CUDA it says so and exits 0. Works without network: when `pipeline` is not
# installed and `pip install -e .` can't reach an index, it runs from the checkout with PYTHONPATH.
# Usage: bash scripts/gpu_check.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out"
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
if ! "$py" -c "import pipeline, torch" 2>/dev/null; then
  "$py" -m pip install -q --timeout 5 --retries 0 -e '.[test]' 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# wheels carried to a machine without an index (the device's `carry`): simplejpeg (the JPEG path),
# tokenizers/transformers (the text steps), fetched beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d wheels simplejpeg
if [ -d wheels ]; then
  "$py" -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | tail -n 2
fi
if ! "$py" -c "import pipeline, torch, numpy, tqdm, cloudpickle"; then
  echo "gpu_check: pipeline's dependencies are missing (torch, numpy, tqdm, cloudpickle)"; exit 1
fi
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to check."
  exit 0
fi
export PYTHONUNBUFFERED=1
log="$out/gpu-check.log"
step() { echo; echo "== $1 ($(date +%H:%M:%S))" | tee -a "$log"; }
cores=$("$py" -c "from pipeline import devices; print(devices.usable_cpus())")
"$py" -m pipeline devices | tee "$log"

step "samples of their own length and text: gpu tests, bench-seq and bench-text on CUDA (never run on a GPU yet)"
timeout 150 "$py" -m pytest -q -p no:cacheprovider tests/test_sequences.py tests/test_text.py -m gpu 2>&1 | tail -n 5 | tee -a "$log"
timeout 200 "$py" -m pipeline bench --config configs/bench-seq.toml --device cuda --modes serial.sorted,pipeline.length,pipeline.tokens,DataLoader \
  --workers-list 2 --json "$out/bench-seq.json" 2>&1 | tee -a "$log"
"$py" -c "import tokenizers, transformers, sentence_transformers" 2>/dev/null && \
  timeout 240 "$py" -m pipeline bench --config configs/bench-text.toml --device cuda --precision bf16 --modes all \
  --workers-list 2 --json "$out/bench-text.json" 2>&1 | tee -a "$log"

step "trace and verdict on CUDA: the H2D-bound test, a traced bench-gpu run and its timeline (never run on a GPU yet)"
timeout 120 "$py" -m pytest -q -p no:cacheprovider tests/test_trace.py -m gpu 2>&1 | tail -n 3 | tee -a "$log"
timeout 90 "$py" -m pipeline run --config configs/bench-gpu.toml --batches 48 --workers 4 --trace "$out/gpu.trace.json" \
  --json > "$out/traced-run.json" 2>>"$log" && "$py" -m pipeline trace "$out/gpu.trace.json" --plot "$out/gpu-trace.png" \
  2>&1 | tail -n 4 | tee -a "$log"
timeout 120 "$py" scripts/bench_trace.py --rounds 3 --workers 4 --json "$out/bench-trace.json" 2>&1 | tee -a "$log"

step "bench-gpu (serial, pipeline, DataLoader, mp.Pool at 1, 2, 4, 8 workers)"
modes=serial,pipeline,DataLoader,mp.Pool
"$py" -c "import ray.data" 2>/dev/null && modes="$modes,ray,ray.data"
timeout 170 "$py" -m pipeline bench --config configs/bench-gpu.toml --batches 48 \
  --modes "$modes" --workers-list 1,2,4,8 --json "$out/bench-gpu.json" 2>&1 \
  | tee -a "$log" | grep -v "^pipeline x"
bench_rc=${PIPESTATUS[0]}

step "test suite"
xdist=""
"$py" -c "import xdist" 2>/dev/null && xdist="-n 8"
timeout 200 "$py" -m pytest -q -p no:cacheprovider $xdist 2>&1 | tee "$out/tests.log" | tail -n 25
tests_rc=${PIPESTATUS[0]}

step "default job: run --workers 4 vs --workers 0"
timeout 45 "$py" -m pipeline run --workers 0 --no-progress --json > "$out/default-serial.json" 2>>"$log"
timeout 45 "$py" -m pipeline run --workers 4 --no-progress --json > "$out/default-w4.json" 2>>"$log"

step "file input: 64 x 64 MB .npy on the GPU, 4 workers"
data=$(mktemp -d)
"$py" - "$data/x.npy" <<'EOF'
import sys, numpy as np
x = np.lib.format.open_memmap(sys.argv[1], mode="w+", dtype=np.float32, shape=(64 * 16384, 1024))
for i in range(64):
    np.random.default_rng([7, i]).random(dtype=np.float32, out=x[i * 16384:(i + 1) * 16384])
x.flush()
EOF
timeout 90 "$py" -m pipeline bench --config configs/bench-gpu.toml --input "$data/x.npy" --rows 16384 \
  --modes serial,pipeline,DataLoader --workers-list 4 --json "$out/bench-file.json" 2>&1 \
  | tee -a "$log" | grep -v "^pipeline x"
rm -rf "$data"

if [ "$cores" -ge 16 ]; then
  step "bench-handoff at 2, 8, 16 workers"
  timeout 90 "$py" -m pipeline bench --config configs/bench-handoff.toml --modes serial,pipeline,DataLoader \
    --workers-list 2,8,16 --json "$out/bench-handoff.json" 2>&1 | tee -a "$log" | grep -v "^pipeline x"
fi

step "your own data: a JPEG dataset (Pillow decode on build threads) vs DataLoader and SPDL"
jpegs="${TMPDIR:-/tmp}/pipeline-bench-jpeg-512"
PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}" timeout 60 "$py" -c \
  "import bench_data, sys; bench_data.make_jpegs(sys.argv[1], 512)" "$jpegs" >>"$log" 2>&1
dmodes=serial,pipeline,DataLoader
"$py" -c "import spdl.pipeline" 2>/dev/null && dmodes="$dmodes,spdl"
PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}" timeout 150 "$py" -m pipeline bench \
  --source bench_data:Jpegs --source-param "root=\"$jpegs\"" --batch-size 32 --kernel bench_data:pixel_sums \
  --modes "$dmodes" --workers-list 2,4,8 --json "$out/bench-jpeg.json" 2>&1 | tee -a "$log" | grep -v "^pipeline x"

step "images: --decode device on CUDA (nvJPEG), then bench-images and bench-images-resnet (resnet50, bf16)"
timeout 90 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_decoding.py tests/test_jpeg.py 2>&1 | tail -n 3 | tee -a "$log"
imodes=serial,pipeline,pipeline.pillow,pipeline.device,DataLoader,torchvision
"$py" -c "import simplejpeg" 2>/dev/null || echo "gpu_check: simplejpeg missing: the pipeline row decodes JPEGs with Pillow (carry wheels/)" | tee -a "$log"
"$py" -c "import spdl.pipeline" 2>/dev/null && imodes="$imodes,spdl"
"$py" -c "import ray.data" 2>/dev/null && imodes="$imodes,ray.data"
timeout 150 "$py" -m pipeline bench --config configs/bench-images.toml --batches 32 --device cuda --modes "$imodes" \
  --workers-list 2,4 --json "$out/bench-images.json" 2>&1 | tee -a "$log" | grep -v "^pipeline x"
timeout 150 "$py" -m pipeline bench --config configs/bench-images-resnet.toml --modes "${imodes%,ray.data}" \
  --workers-list 4 --json "$out/bench-images-resnet.json" 2>&1 | tee -a "$log" | grep -v "^pipeline x"

step "lesson 09: tensors crossing processes"
timeout 75 "$py" scripts/lessons/09_gpu_data.py --json "$out/gpu-facts.json" --markdown "$out/gpu-facts.md" \
  > "$out/gpu-facts.log" 2>&1
facts_rc=$?
tail -n 3 "$out/gpu-facts.log"

step "summary"
"$py" scripts/gpu_summary.py "$out" | tee "$out/summary.md"
echo "gpu_check: tests exit $tests_rc, lesson 09 exit $facts_rc, bench-gpu exit $bench_rc; files in $out"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$facts_rc" -eq 0 ]
