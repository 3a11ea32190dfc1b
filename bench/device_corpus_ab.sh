#!/usr/bin/env bash
# Issue 10 on a lent H200: the corpus job alone (bench/bench_corpus.py --no-reference, cold
# then warm), alternating a variant of the code with this tree: VARIANT, main, VARIANT, main.
#
#   run(command="bash bench/device_corpus_ab.sh oldreader", carry=[".whl", ".gpu_audio"])
#
# VARIANT: the files under bench/ab_variants/VARIANT/ laid over a copy of this tree
# (`variant_tree` of bench/device_env.sh; an untracked folder made for the A/B, e.g. from
# a results folder's variant_VARIANT.patch).
# The corpus is the 4.43 h one of BENCHMARKS §7 (every klettres file and MUSIC_PIECES
# Wesnoth pieces of 5-60 s), built from .gpu_audio/ as bench/device_session.sh describes.
set -u
VARIANT=${1:?usage: device_corpus_ab.sh VARIANT}
OUT=${OUT:-bench_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
source bench/device_env.sh .whl
REPO=$PWD
python3 bench/make_corpus.py /tmp/bench_corpus --speech .gpu_audio/speech --speech-files 100000 \
  --music .gpu_audio/music --music-pieces "${MUSIC_PIECES:-400}" | tail -2
variant_tree "$VARIANT" || exit 1
tree_v=/tmp/ab_$VARIANT
for run in ${VARIANT}1 main1 ${VARIANT}2 main2; do
  tree=$REPO; [[ $run == main* ]] || tree=$tree_v
  echo "=== $run $(date -u +%H:%M:%S)"
  (cd "$tree" && PYTHONPATH=$tree:/tmp/site timeout 150 python3 bench/bench_corpus.py \
    /tmp/bench_corpus --preset snac_24khz --dtype bfloat16 --batch-size 32 --workers "$(nproc)" \
    --no-reference --out "$OUT/corpus_$run.json" 2>&1 \
    | grep -E "codec_jax|timings" | tee -a "$OUT/corpus_ab.log")
done
