#!/usr/bin/env bash
# Tests and benchmarks on a GPU machine, in phases of at most 10 minutes each, in order of value; run them as separate
# commands from the repository root:
#
#   bash benchmarks/run_on_gpu.sh tests   # (a) ~4 min: the kernels' correctness tests (bf16 included), compiled
#   bash benchmarks/run_on_gpu.sh tests-serving  # (a') <= 2.5 min: only the serving kernels' tests, before `serve`
#                                          #     when only the serving numbers are wanted
#   bash benchmarks/run_on_gpu.sh train   # (b) ~6 min: training ratios at the 6 shapes: cuBLAS, eager, PEFT and
#                                          #     lora_kernels with both base GEMMs; fwd, fwd+bwd, fwd+bwd dropout
#   bash benchmarks/run_on_gpu.sh serve   # (c) <= 9.3 min: multi-adapter layers (few points), decode; CUDA graphs
#   bash benchmarks/run_on_gpu.sh extras  # only if time is left: CUDA extension build + tests, the full suite
#
# Then, on any machine (CPU, seconds), fit the static serving model's constants (bandwidth, cuBLAS and Triton GEMM
# rates, a plain and a PDL'd launch's cost, PDL overlap, L2 bandwidth) to the serve phase's multi-adapter CSVs and see
# which path rules to move:
#
#   python benchmarks/calibrate_serving.py out/multi_*.csv out/decode_*.csv --markdown out/calibrate.md --json out/calibrate.json
#
# Every step has its own timeout, and every result is written as soon as it exists: the logs are teed line by line,
# the benchmarks run one shape per process with its own CSV, so a call cut short keeps every finished point.
# Everything goes under $OUT (or ./out): logs, CSVs, card.txt (card, driver, versions). The machine has no network:
# nothing is installed, the package runs from the checkout (PYTHONPATH=.).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # kernels compiled for the GPU, never interpreted
phase="${1:-tests}"
py=python3

run() {  # run one step with a timeout (seconds), tee its output into $out/<name>.log, keep going on failure
  local name="$1" limit="$2"; shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$out/$name.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]} ($(date -u +%T))" | tee -a "$out/$name.log"
}

card() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$out/card.txt"
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/card.txt"
}

# Training: one process per shape (its CSV is written when the shape is done). Autotuning off: the first config of
# each kernel runs, the one the static report (benchmarks/static_report.py) predicts; autotuning every config of
# every kernel variant would not fit in the phase's 10 minutes.
TRAIN_SHAPES="4096:4096:16 4096:4096:64 4096:14336:16 14336:4096:16 4096:14336:64 14336:4096:64"
# lk_triton_base takes the persistent TMA kernels on an H100 (aligned bf16 operands).
TRAIN_PROVIDERS="base,eager,peft,lk_cublas_base,lk_triton_base"

case "$phase" in
  tests)
    card
    # (a) Correctness of every Triton kernel against the float64 reference, bf16 included (the interpreter cannot
    # check bf16 tl.dot), then the inputs checks. No -x: one failure must not hide the others.
    run tests_kernels 300 $py -m pytest tests/test_lora_linear.py tests/test_lora_linear_tma.py \
        tests/test_lora_linear_launches.py tests/test_dropout_bits.py tests/test_dy_pass.py tests/test_fused_shrink.py tests/test_multi_lora.py \
        tests/test_multi_lora_serving.py tests/test_lora_decode.py -q -rfE \
        -p no:cacheprovider --maxfail=25 --durations=10
    run tests_inputs 60 $py -m pytest tests/test_bad_inputs.py tests/test_base_gemm_choice.py -q -rfE \
        -p no:cacheprovider --maxfail=25
    ;;
  tests-serving)
    card
    run tests_serving 150 $py -m pytest tests/test_multi_lora_serving.py tests/test_multi_lora.py \
        tests/test_lora_decode.py -q -rfE -p no:cacheprovider --maxfail=25 --durations=10
    ;;
  train)
    card
    for s in $TRAIN_SHAPES; do
      IFS=: read -r k n r <<< "$s"
      LORA_KERNELS_AUTOTUNE=0 run "train_${k}_${n}_r${r}" 75 $py benchmarks/bench_lora_linear.py --skip-decode \
          --kn "$k:$n" --ranks "$r" --modes "fwd,fwd+bwd,fwd+bwd dropout" --providers "$TRAIN_PROVIDERS" \
          --warmup-ms 10 --rep-ms 50 --csv "$out/train_${k}_${n}_r${r}.csv"
    done
    ;;
  serve)
    card
    # Step limits sum to 590 s (one 10-minute call). The multi-adapter grid first: it feeds
    # benchmarks/calibrate_serving.py. Graph (weights hot in L2, as the peers were measured) and cycled (weights from
    # DRAM, as the static model prices them). lk_gemm_serial against lora_kernels measures PDL's overlap; at 256
    # tokens lk_joined (the step in one launch, opt-in) against lora_kernels (the PDL pair) decides JOINED.
    for t in 1 16 64 256 4096; do
      joined=""; [ "$t" = 256 ] && joined=",lk_joined"
      run "multi_T$t" 50 $py benchmarks/bench_multi_lora.py --adapters 16 --tokens "$t" --dists uniform,mix \
          --timings graph,cycled --providers "base,lora_kernels,lk_split,lk_gemm_plain,lk_gemm_2l,lk_gemm_serial$joined" \
          --csv "$out/multi_T$t.csv"
    done
    # the TMA GEMM's tile forced: L2 re-reads of x and W0 against busy SMs (a tile per provider, the default first)
    run multi_tiles 60 $py benchmarks/bench_multi_lora.py --adapters 16 --tokens 256 1024 --dists uniform,mix \
        --timings cycled --providers base,lk_gemm,lk_gemm_t128x256,lk_gemm_t128x128,lk_gemm_t64x256,lk_gemm_t64x128 \
        --csv "$out/multi_tiles.csv"
    # compute-bound steps, ids uniform over 16 and 128 adapters (several adapters per row tile: the side path is the
    # default): the TMA GEMM in the ids' order with and without PDL's overlap of the shrink, the side path forced,
    # the sorted-row GEMM fed by the shrink's copy of x (the default of such steps before the side path) and the
    # split path (lk_gemm_sorted, x gathered by pointers, no longer fits this step's time)
    run multi_prefill 140 $py benchmarks/bench_multi_lora.py --adapters 16 128 --tokens 1024 4096 --dists uniform \
        --timings graph,cycled \
        --providers base,lora_kernels,lk_split,lk_gemm,lk_gemm_serial,lk_side,lk_gemm_sorted_copy \
        --csv "$out/multi_prefill.csv"
    for d in 1:4096:4096 16:4096:4096 256:4096:4096 1:8192:8192; do
      LORA_KERNELS_AUTOTUNE=0 run "decode_${d//:/_}" 35 $py benchmarks/bench_lora_linear.py --skip-train \
          --decode "$d" --decode-timings graph,cycled --providers base,eager,lora_kernels,lk_cublas_base,lk_triton_base,lk_decode \
          --csv "$out/decode_${d//:/_}.csv"
    done
    ;;
  extras)
    card
    run build 240 $py setup.py build_ext --inplace
    $py -c "from lora_kernels import cuda; print('cuda ext:', cuda.cuda_ops_unavailable_reason() or 'ok')" | tee -a "$out/card.txt"
    run tests_cuda_ext 120 $py -m pytest tests/test_cuda_ext.py -q -rfE -p no:cacheprovider
    run sanitizer 60 compute-sanitizer --tool memcheck $py csrc/sanitizer_check.py
    run tests_all 420 $py -m pytest tests -q -rfE -p no:cacheprovider --maxfail=50 --durations=15
    ;;
  *)
    echo "usage: $0 tests|tests-serving|train|serve|extras" >&2
    exit 2
    ;;
esac
