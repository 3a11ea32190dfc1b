#!/usr/bin/env bash
# Issue 16 item 1 on a lent H200: the fused residual kernels against XLA's units, then
# the whole 32 kHz bf16 b64 decode with each lowering, one process per command.
#
#   run(command="bash bench/device_decode_kernels.sh", carry=[".whl"])
#
# TILES: the kernels' tiles for check_fused_residual.py (STEPSxWARPS for the unit kernel,
# sSTEPSxWARPS for the stack form); VARIANTS: profile_decode.py variants (the first one
# is the only true first call of its process).
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
source bench/device_env.sh .whl
TILES=${TILES:-"s64x4 s128x4 s64x8 s32x4 s128x8"}
VARIANTS=${VARIANTS:-"polyphase/dot/auto polyphase/dot+stack/auto polyphase/dot+stack128x4/auto polyphase/dot/auto"}
echo "=== check_fused_residual $(date -u +%H:%M:%S)"
CHECK=1 timeout "${CHECK_SECONDS:-240}" python3 bench/check_fused_residual.py $TILES 2>&1 \
  | tee "$OUT/check_fused_residual.log" | grep -v "^\s*$" | tail -60
echo "=== profile_decode $(date -u +%H:%M:%S)"
timeout "${PROFILE_SECONDS:-300}" python3 bench/profile_decode.py --preset snac_32khz --batch 64 \
  --dtype bfloat16 --variants $VARIANTS --out "$OUT/profile_decode.jsonl" 2>&1 \
  | tee "$OUT/profile_decode.log" | grep -v "^\s*$" | tail -30
echo "=== done $(date -u +%H:%M:%S)"
