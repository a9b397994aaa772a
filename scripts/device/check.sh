#!/usr/bin/env bash
# The GPU check of the CUDA backends (issue 7), in one device call: a task lent a GPU has 15
# minutes of device time, a call at most 10. Prepare here first, then call the device tool:
#   python scripts/device/prepare.py --tcnn GIT_DIR --fmt GIT_DIR --cutlass GIT_DIR
#   run(command="bash scripts/device/check.sh", carry=[".whl", ".carry"], timeout_s=590)
# Steps, each under its own time limit and all inside DEADLINE_S (560 s: a step that would not
# fit is cut short or skipped, so the call returns with its logs), every log in $OUT:
#   env.txt         GPU, nvcc, torch
#   tcnn_build.log  tiny-cuda-nn's torch bindings, encodings only (built in the background)
#   tests.log       tests/test_cuda_backends.py + test_mixed_precision.py: nerfacc + fp16 first, tcnn once built
#   bench.log       scripts/benchmark.py on DTU scan 24 at 800x600 (confs/neus-dtu-wmask.yaml),
#                   torch vs tcnn + nerfacc, from scratch and from a 1000-step checkpoint
#   train.log       the 1000-step tcnn + nerfacc training run (time per step, PSNR)
set -u
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + ${DEADLINE_S:-560}))
stamp() { echo "[$(($(date +%s) - START)) s] $*" | tee -a "$OUT/summary.txt"; }
cap() {  # seconds for a step that asks for $1: no more than what is left before the deadline
  local left=$((DEADLINE - $(date +%s)))
  echo $(( left < $1 ? (left > 0 ? left : 1) : $1 ))
}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing the carried wheels failed"; exit 1; }
export PYTHONPATH=/tmp/site:/tmp/tcnn/bindings/torch:$PWD
{ nvidia-smi -L; nvcc --version | tail -2
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stamp "building tiny-cuda-nn (encodings only, sm_90) in the background"
mkdir -p /tmp/tcnn && tar -xzf .carry/tiny-cuda-nn.tar.gz -C /tmp/tcnn
(cd /tmp/tcnn/bindings/torch && TCNN_CUDA_ARCHITECTURES=90 timeout $(cap 300) python3 setup.py build_ext --inplace --no-networks) \
  > "$OUT/tcnn_build.log" 2>&1 &
BUILD=$!

stamp "CUDA tests without tcnn (nerfacc compiles its kernels on first use)"
timeout $(cap 240) python3 -m pytest -q -rs tests/test_cuda_backends.py tests/test_mixed_precision.py -k "not tcnn" > "$OUT/tests.log" 2>&1
tail -4 "$OUT/tests.log" | tee -a "$OUT/summary.txt"

wait $BUILD
stamp "tcnn build exit status $?; import: $(python3 -c 'import tinycudann; print("ok")' 2>&1 | tail -1)"
stamp "CUDA tests of tcnn"
timeout $(cap 60) python3 -m pytest -q -rs tests/test_cuda_backends.py -k "tcnn" >> "$OUT/tests.log" 2>&1
tail -4 "$OUT/tests.log" | tee -a "$OUT/summary.txt"

SCENE=dataset.root_dir=.carry/dtu_scan24_800x600
TORCH="model.geometry.xyz_encoding.backend=torch model.sampler.backend=torch"
FAST="model.geometry.xyz_encoding.backend=tcnn model.sampler.backend=nerfacc"
bench() {  # label, extra arguments
  local label=$1; shift
  echo "== $label" >> "$OUT/bench.log"
  timeout "$(cap 45)" python3 scripts/benchmark.py --config confs/neus-dtu-wmask.yaml $SCENE --warmup 30 --steps 100 "$@" \
    2>&1 | tr "\r" "\n" | grep -E "^(config|steps)|Error" >> "$OUT/bench.log"
}
stamp "benchmark from scratch"
bench "torch, from scratch" $TORCH
bench "tcnn + nerfacc, from scratch" $FAST

stamp "1000 steps of tcnn + nerfacc training"
timeout "$(cap 100)" python3 run.py --config confs/neus-dtu-wmask.yaml --train --outputs_dir /tmp/runs $SCENE $FAST \
  trainer.max_steps=1000 trainer.val_every=500 trainer.ckpt_every=500 trainer.test_at_end=false > "$OUT/train.log" 2>&1
stamp "training exit status $?"
CKPT=$(ls /tmp/runs/*/*/ckpt/ckpt_001000.pth 2>/dev/null | head -1)
if [ -n "$CKPT" ]; then  # the torch run also checks that a tcnn checkpoint resumes under torch
  stamp "benchmark from the 1000-step checkpoint"
  bench "torch, trained 1000" --resume "$CKPT" $TORCH
  bench "tcnn + nerfacc, trained 1000" --resume "$CKPT" $FAST
fi
cat "$OUT/bench.log" | tee -a "$OUT/summary.txt"
grep -a "INFO" /tmp/runs/*/*/train.log 2>/dev/null | tail -8 >> "$OUT/summary.txt"
stamp "done"
