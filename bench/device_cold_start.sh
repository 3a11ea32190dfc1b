#!/usr/bin/env bash
# Issue 15 item 1 on a lent H200: where the cold start of `codec-jax train` goes
# (bench/bench_cold_start.py phases: state init trace/compile/run, train step
# trace/compile/first run, then 20 timed steps), at configs/snac_24khz.py with the
# trainer's own defaults (no XLA_FLAGS). Parts: `kernel` (the trainer as it is: the
# initialiser with the threefry GPU kernel), `unrolled` (the initialiser without it),
# `step_kernel` (the step with it too: the A/B of the step's compile and speed),
# `check_init`, and `kernel+XLA_FLAG=VALUE` variants.
#
#   run(command="bash bench/device_cold_start.sh", carry=[".whl"])
#
# .whl/ as for bench/device_session.sh. COLD_PARTS lists the parts, in order; each has
# its own time limit (the device call stops at 600 s). `check_init` compares the initial
# models of the two lowerings array by array (bench/check_threefry_init.py).
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
source bench/device_env.sh .whl
COLD="python3 bench/bench_cold_start.py --config snac_24khz --until step --time-steps ${COLD_STEPS:-20}"
for part in ${COLD_PARTS:-kernel unrolled}; do
  echo "=== $part $(date -u +%H:%M:%S)"
  case "$part" in
    kernel) timeout "${KERNEL_SECONDS:-270}" $COLD --json "$OUT/$part.json" ;;
    # The train step's own threefry lowering, A/B: the trainer's (unrolled) is `kernel`.
    step_kernel) timeout "${KERNEL_SECONDS:-270}" $COLD --step-threefry-kernel --json "$OUT/$part.json" ;;
    check_init) timeout "${CHECK_SECONDS:-200}" python3 bench/check_threefry_init.py --config snac_24khz --json "$OUT/$part.json" ;;
    unrolled) timeout "${UNROLLED_SECONDS:-300}" $COLD --override train.threefry_gpu_kernel_init=False --json "$OUT/$part.json" ;;
    # kernel+FLAG=VALUE[,FLAG=VALUE]: the kernel part with these XLA_FLAGS (without "--"),
    # e.g. kernel+xla_gpu_autotune_level=2 or kernel+xla_gpu_enable_triton_gemm=false.
    kernel+*)
      flags=$(echo "${part#kernel+}" | sed 's/^/--/; s/,/ --/g')
      name=$(echo "$part" | tr -c 'A-Za-z0-9_\n' '_')
      XLA_FLAGS="$flags" timeout "${VARIANT_SECONDS:-240}" $COLD --json "$OUT/$name.json" ;;
    *) echo "unknown part $part" >&2 ;;
  esac 2>&1 | tee -a "$OUT/cold_start.log" | tail -20
done
echo "=== done $(date -u +%H:%M:%S)"
