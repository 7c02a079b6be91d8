#!/usr/bin/env bash
# Tests and benchmarks on a GPU machine, in phases of at most 10 minutes each (one phase per call on a machine that
# limits a command's run time). Run from the repository root on the GPU machine:
#
#   bash benchmarks/run_on_gpu.sh tests     # build the CUDA extension in place, GPU + CPU test suite, sanitizer
#   bash benchmarks/run_on_gpu.sh train     # bench_lora_linear training shapes (fwd, fwd+bwd, dropout)
#   bash benchmarks/run_on_gpu.sh serve     # decode shapes, multi-adapter layers, BGMV kernels, LoRA-GA, PEFT model
#
# Everything printed is also written under $OUT (or ./out when OUT is unset), with the card, versions and command
# line that BENCHMARKS.md needs. The GPU machine has no network: nothing is installed, the package runs from the
# checkout (PYTHONPATH=.), and the extension is built in place with the image's cmake, ninja and pybind11.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
phase="${1:-tests}"
py=python3

run() {  # run a command, tee its output into $out/<name>.log, keep going on failure (the log says what broke)
  local name="$1"; shift
  echo "=== $name: $*" | tee -a "$out/$name.log"
  timeout "${STEP_TIMEOUT:-540}" "$@" 2>&1 | tee -a "$out/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$out/$name.log"
}

case "$phase" in
  tests)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.txt"
    $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/card.txt"
    run build $py setup.py build_ext --inplace
    $py -c "from lora_kernels import cuda; print('cuda ext:', cuda.cuda_ops_available() or 'ok')" | tee -a "$out/card.txt"
    # On a GPU the Triton kernels are compiled, not interpreted; the gpu-marked tests run too.
    STEP_TIMEOUT=420 run tests $py -m pytest tests -q -x -p no:cacheprovider --durations=15
    run sanitizer compute-sanitizer --tool memcheck $py csrc/sanitizer_check.py
    ;;
  train)
    run bench_train $py benchmarks/bench_lora_linear.py --skip-decode --modes fwd,fwd+bwd \
        --csv "$out/train.csv" --plot "$out/train.png"
    ;;
  train-dropout)
    run bench_train_dropout $py benchmarks/bench_lora_linear.py --skip-decode --modes "fwd+bwd dropout" \
        --csv "$out/train_dropout.csv"
    ;;
  serve)
    STEP_TIMEOUT=150 run bench_decode $py benchmarks/bench_lora_linear.py --skip-train --csv "$out/decode.csv"
    STEP_TIMEOUT=200 run bench_multi $py benchmarks/bench_multi_lora.py --csv "$out/multi.csv" --plot "$out/multi.png"
    STEP_TIMEOUT=90 run bench_bgmv $py csrc/bench_bgmv.py --csv "$out/bgmv.csv"
    STEP_TIMEOUT=60 run bench_lora_ga $py benchmarks/bench_lora_ga.py --quick
    STEP_TIMEOUT=60 run bench_peft $py benchmarks/bench_peft_model.py --csv "$out/peft_model.csv"
    ;;
  *)
    echo "usage: $0 tests|train|train-dropout|serve" >&2
    exit 2
    ;;
esac
