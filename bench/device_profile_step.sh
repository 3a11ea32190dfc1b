#!/usr/bin/env bash
# Issue 15 item 2 on a lent H200: where the GAN train step's device time goes
# (bench/profile_train_step.py: snac_24khz, 16 x 1 s, bf16), on this tree (`main`) or on
# a variant (`variant_tree NAME` of bench/device_env.sh: this tree with the files under
# bench/ab_variants/NAME/ laid over it), one after the other on one machine. `dotgrad`:
# this tree with the polyphase conv's weight gradient as matmuls (the CPU default; on the
# GPU XLA's weight-gradient convolution is the default until this A/B says otherwise).
#
#   run(command="bash bench/device_profile_step.sh main", carry=[".whl"])
#   run(command="bash bench/device_profile_step.sh main NAME", carry=[".whl"])
#
# Command buffers are off, so that the trace names every operation; the compilation
# cache (/tmp/pcache) makes a repeated part on a still-warm machine start in seconds.
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
source bench/device_env.sh .whl
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_command_buffer=}"
export JAX_COMPILATION_CACHE_DIR=/tmp/pcache
ARGS="--config snac_24khz --batch 16 --seconds 1.0 --dtype bfloat16 --top ${TOP:-40}"
for part in "$@"; do
  echo "=== $part $(date -u +%H:%M:%S)"
  case "$part" in
    main) timeout "${PART_SECONDS:-420}" python3 bench/profile_train_step.py $ARGS \
            --out "$OUT/profile_main" ;;
    dotgrad) timeout "${PART_SECONDS:-420}" python3 bench/profile_train_step.py $ARGS \
            --layers polyphase_weight_grad=dot --out "$OUT/profile_dotgrad" ;;
    *)
      variant_tree "$part" || continue
      tree=/tmp/ab_$part
      (cd "$tree" && PYTHONPATH=$tree:/tmp/site timeout "${PART_SECONDS:-420}" \
        python3 bench/profile_train_step.py $ARGS --out "$OUT/profile_$part") ;;
  esac 2>&1 | tee -a "$OUT/profile_step.log" | grep -v "^\s*$" | tail -150
done
echo "=== done $(date -u +%H:%M:%S)"
