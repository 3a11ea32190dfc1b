#!/usr/bin/env bash
# The corpus-job benchmark on a lent GPU machine (one H200), in one command:
#   installs the wheels carried in .whl/ (soundfile, cffi, pycparser, soxr, snac), builds the
#   demo corpus from a carried folder of real .ogg files (klettres speech copied as is,
#   Wesnoth music cut into 5-60 s pieces), and runs bench/bench_corpus.py beside the reference
#   loop, writing JSON and logs to $OUT.
#
#   run(command="bash bench/device_corpus.sh .corpus_src", carry=[".whl", ".corpus_src"])
#
# .corpus_src/ (25 MB, not in git) holds speech/*.ogg (700 klettres files) and music/*.ogg
# (3 Wesnoth tracks), made here after `scripts/prepare_demo_data.sh`'s apt install with
#   python bench/make_corpus.py .corpus_src --speech-files 700 \
#       --copy-music elvish-theme.ogg love_theme.ogg loyalists.ogg
# Environment: PRESET (snac_24khz), DTYPE (bfloat16), MUSIC_PIECES (300), BATCH (32),
# REF_LIMIT (0 = the reference codes every file too).
set -euo pipefail
SRC=${1:-.corpus_src}
OUT=${OUT:-bench_out}
PRESET=${PRESET:-snac_24khz}
DTYPE=${DTYPE:-bfloat16}
MUSIC_PIECES=${MUSIC_PIECES:-300}
BATCH=${BATCH:-32}
REF_LIMIT=${REF_LIMIT:-0}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD

if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site
fi
python3 - <<'EOF'
import jax, torch, soundfile, soxr, snac
print("jax", jax.__version__, jax.devices(), "| torch", torch.__version__,
      torch.cuda.get_device_name(), "| libsndfile", soundfile.__libsndfile_version__)
EOF

CORPUS=/tmp/bench_corpus
rm -rf "$CORPUS"
python3 bench/make_corpus.py "$CORPUS" --speech "$SRC/speech" --speech-files 100000 \
  --music "$SRC/music" --music-pieces "$MUSIC_PIECES"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader || true

extra=()
[[ "$REF_LIMIT" != 0 ]] && extra+=(--reference-limit "$REF_LIMIT")
# Sample GPU utilisation once a second while the bench runs (a second view beside the
# bench's own compute / wall estimate).
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 \
  >"$OUT/nvidia_smi.csv" 2>/dev/null &
SMI=$!
timeout 540 python3 bench/bench_corpus.py "$CORPUS" --preset "$PRESET" --dtype "$DTYPE" \
  --batch-size "$BATCH" --workers "$(nproc)" --out "$OUT/bench_corpus_${PRESET}_${DTYPE}.json" \
  "${extra[@]}" 2>&1 | tee "$OUT/bench_corpus.log"
kill "$SMI" 2>/dev/null || true
