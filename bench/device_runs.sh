#!/usr/bin/env bash
# The GPU benchmark runs behind BENCHMARKS.md, by name, so that a few of them fit one call
# of a lent machine (at most 10 minutes each). One process per preset and implementation, each
# under its own time limit, so that JAX and PyTorch never share GPU memory and one stuck
# configuration cannot eat the others' time. Results: JSON lines and logs under $OUT
# (default ./bench_out).
#
#   bash bench/device_runs.sh train_bf16 train_fp32    # issue 4, one GPU
#   bash bench/device_runs.sh scaling                  # issue 4, all local GPUs
#   bash bench/device_runs.sh compile24 jax32_fp32     # issue 2
# Names: train_bf16 train_fp32 scaling eager44_fp32 eager44_bf16 compile24 compile32
# compile44 jax32_fp32.
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
HERE=$(cd "$(dirname "$0")" && pwd)

step() {  # step SECONDS NAME CMD...
  local limit=$1 name=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name exit $? $(date -u +%H:%M:%S)"
  grep -E '^\{|^\||x real|speed-up|FAILED|Error' "$OUT/$name.log" | grep -v Warning | tail -30
}

codec() {  # codec SECONDS NAME ARGS...
  local limit=$1 name=$2
  shift 2
  step "$limit" "$name" python3 "$HERE/bench_codec.py" --repeats 3 --out "$OUT/codec.jsonl" "$@"
}

for name in "$@"; do
  case "$name" in
    train_bf16)  # generator step vs reference + full GAN step, bf16 compute
      step 330 train_bf16 python3 "$HERE/bench_train.py" --preset snac_24khz --batch 16 \
        --seconds 1.0 --dtype bfloat16 --json "$OUT/train_bf16.json" ;;
    train_fp32)
      step 170 train_fp32 python3 "$HERE/bench_train.py" --preset snac_24khz --batch 16 \
        --seconds 1.0 --dtype float32 --skip-gan --json "$OUT/train_fp32.json" ;;
    scaling)  # GAN step on one GPU, then data-parallel over all local GPUs (weak scaling)
      nvidia-smi -L
      step 560 scaling python3 "$HERE/bench_train.py" --preset snac_24khz --batch 16 \
        --seconds 1.0 --dtype bfloat16 --skip-generator --json "$OUT/scaling.json" ;;
    eager44_fp32) codec 100 eager44_fp32 --presets snac_44khz --impls torch_eager --dtypes float32 --batches 64 ;;
    eager44_bf16) codec 100 eager44_bf16 --presets snac_44khz --impls torch_eager --dtypes bfloat16 ;;
    compile24) codec 280 compile24 --presets snac_24khz --impls torch_compile ;;
    compile32) codec 300 compile32 --presets snac_32khz --impls torch_compile ;;
    compile44) codec 300 compile44 --presets snac_44khz --impls torch_compile ;;
    jax32_fp32) codec 230 jax32_fp32 --presets snac_32khz --impls jax --dtypes float32 ;;
    *) echo "unknown run $name" >&2; exit 2 ;;
  esac
done
