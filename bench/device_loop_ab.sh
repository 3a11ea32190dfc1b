#!/usr/bin/env bash
# Issue 15 item 2 on a lent H200: the trainer's loop against its own step
# (bench/bench_loop_vs_step.py), and A/B runs of trainer variants in the same machine.
#
#   run(command="bash bench/device_loop_ab.sh full", carry=[".whl", ".gpu_audio"])
#   run(command="bash bench/device_loop_ab.sh B C main", carry=[".whl", ".gpu_audio"])
#
# `full`: every view of bench_loop_vs_step on this tree (the first run on a machine compiles
# the step and fills /tmp/lvs/xla_cache). Any other part NAME runs view 1 only (the trainer,
# `--trainer-only`, step loaded from that cache): `main` on this tree, otherwise on a copy
# of this tree with the files under bench/ab_variants/NAME/ laid over it (`variant_tree`
# of bench/device_env.sh; an untracked folder made for the A/B, the results folder keeps
# each variant's patch). The runs share
# /tmp/lvs (dataset, XLA cache), so later calls must find the machine warm.
# .gpu_audio/speech: the demo speech set (bench/device_session.sh says how it is made).
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
source bench/device_env.sh .whl
REPO=$PWD
LVS="bench/bench_loop_vs_step.py --config snac_24khz --source-dir $REPO/.gpu_audio/speech
     --workdir /tmp/lvs --steps ${LVS_STEPS:-600}"
for part in "$@"; do
  echo "=== $part $(date -u +%H:%M:%S)"
  rm -rf /tmp/lvs/train  # each run trains from step 0
  case "$part" in
    full) timeout "${FULL_SECONDS:-480}" python3 $LVS --json "$OUT/lvs_full.json" ;;
    main) timeout "${AB_SECONDS:-150}" python3 $LVS --trainer-only --json "$OUT/lvs_main.json" ;;
    *)
      variant_tree "$part" || continue
      tree=/tmp/ab_$part
      (cd "$tree" && PYTHONPATH=$tree:/tmp/site timeout "${AB_SECONDS:-150}" \
        python3 $LVS --trainer-only --json "$OUT/lvs_$part.json") ;;
  esac 2>&1 | tee -a "$OUT/loop_ab.log" | grep -v "^\s*$" | tail -12
done
echo "=== done $(date -u +%H:%M:%S)"
