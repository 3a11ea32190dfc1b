#!/usr/bin/env bash
# Issue 15 item 3 on a lent H200: the reference GAN step (pip `snac` + DAC's discriminator and
# losses, bench/bench_gan_reference.py) beside ours (bench/bench_train.py's GAN step, same
# models: full-width discriminator, factorized quantizer) in one call, at snac_24khz 16 x 1 s.
#
#   run(command="bash bench/device_gan_reference.sh", carry=[".whl", ".whl_ref"])
#
# .whl/ as for bench/device_session.sh (snac, soundfile, grain, tfds, ...); .whl_ref/ holds
# descript-audio-codec 1.0.0, descript-audiotools 0.7.2 and what their imports need
# (argbind, flatten-dict, julius, ffmpy, importlib-resources, randomname, boto3, botocore,
# jmespath, s3transfer, pystoi, and librosa 0.11.0 with audioread, decorator, pooch and
# platformdirs: audiotools builds DAC's mel filters with librosa), all --no-deps, for CPython
# 3.12 (argbind and randomname are sdists: `pip wheel --no-deps` them with a 3.12 Python).
# torchaudio is the device's. The imports are checked before anything is timed: the first
# attempt (2026-12-03) lacked librosa and lost its reference rows.
# Each part has its own time limit (GAN_PARTS lists them, in order; the call stops at 600 s).
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
source bench/device_env.sh .whl .whl_ref
python3 -c "import dac.model.discriminator, dac.nn.loss, audiotools, librosa, snac, grain" || exit 1
REF="python3 bench/bench_gan_reference.py --preset snac_24khz --batch 16 --seconds 1.0"
for part in ${GAN_PARTS:-ref_eager_bf16 ours_bf16 ref_eager_f32 ref_compile_bf16}; do
  echo "=== $part $(date -u +%H:%M:%S)"
  case "$part" in
    ref_eager_bf16) timeout 150 $REF --dtype bfloat16 --compile none --json "$OUT/$part.json" ;;
    ref_eager_f32) timeout 120 $REF --dtype float32 --compile none --json "$OUT/$part.json" ;;
    ref_compile_bf16) timeout "${COMPILE_SECONDS:-200}" $REF --dtype bfloat16 --compile both --json "$OUT/$part.json" ;;
    ours_bf16)
      # Autotune level 2, as the GAN-step rows of BENCHMARKS.md §4-5 were measured.
      XLA_FLAGS=--xla_gpu_autotune_level=2 timeout 300 python3 bench/bench_train.py \
        --preset snac_24khz --batch 16 --seconds 1.0 --dtype bfloat16 --skip-generator \
        --set quantizer.kind=factorized --json "$OUT/$part.json" ;;
    *) echo "unknown part $part" >&2 ;;
  esac 2>&1 | grep -v "Warning\|warn(" | tee -a "$OUT/gan_reference.log" | tail -25
done
echo "=== done $(date -u +%H:%M:%S)"
