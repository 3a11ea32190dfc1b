#!/usr/bin/env bash
# One call of a lent H200 for the end-to-end jobs: the corpus tokenizer beside the reference
# loop (issue 10) and a segment of the quality-vs-compute training run (issues 14, 15, 17).
# Back-to-back calls find the machine warm, so /tmp/qc (dataset, checkpoints, XLA cache)
# carries the training run from one call to the next; a cold machine starts it again.
#
#   run(command="bash bench/device_session.sh corpus curve", carry=[".whl", ".gpu_audio"])
#   run(command="bash bench/device_session.sh curve", carry=[".whl", ".gpu_audio"])
#
# .gpu_audio/ (not in git, ~47 MB): speech/ = every .ogg of Debian's klettres-data with its
# folder structure (the demo speech set, as scripts/prepare_demo_data.sh reads it) and
# music/ = two Wesnoth tracks (underground.ogg, main_menu.ogg), cut into pieces for the
# corpus job. .whl/ holds the wheels (bench/device_corpus.sh, bench/quality_curve.py, and
# pesq, libsvm-official, pystoi, visqol-python for the evaluation). Made here with
#   mkdir -p .gpu_audio/speech .gpu_audio/music && echo /.gpu_audio/ >> .git/info/exclude
#   (cd /usr/share/klettres && find . -name '*.ogg' -exec cp --parents {} "$OLDPWD/.gpu_audio/speech/" \;)
#   cp /usr/share/games/wesnoth/1.16/data/core/music/{underground,main_menu}.ogg .gpu_audio/music/
# The whole travelling tree is then ~65 MB of the 64 MiB (67.1 MB) a call may carry.
# Calls must follow each other within the machine's 30 s idle window, or /tmp/qc is gone.
# Environment: CURVE_LAST (set: the curve's last call, which ends the run at the step it can
# reach), CURVE_MINUTES (minutes left to the curve segment, default 8.5),
# CURVE_STEPS (export/eval steps), CURVE_NO_EVAL (set: export without evaluating, e.g. for
# `entropy`), CORPUS_SECONDS (limit of the corpus bench).
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
# .whl/README.txt: the carried googleapis-common-protos needs protobuf >= 6.33.5.
export TEMPORARILY_DISABLE_PROTOBUF_VERSION_CHECK=true
t_start=$(date +%s)
if [[ ! -f /tmp/site/.installed ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && touch /tmp/site/.installed || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site
python3 -c "import jax, torch, soundfile, soxr, snac, grain, tensorflow_datasets, constriction; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)" || exit 1
# The curve's evaluation needs the metric wheels too; CURVE_NO_EVAL=1 trains and exports only.
if [[ " $* " == *" curve "* && -z "${CURVE_NO_EVAL:-}" ]]; then
  python3 -c "import pesq, pystoi, visqol" || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv,noheader

for part in "$@"; do
  echo "=== $part $(date -u +%H:%M:%S)"
  case "$part" in
    corpus)
      # All 1836 klettres files and 100 music pieces of 5-60 s; the reference loop codes an
      # even spread of 500 of them (its rate is per audio second, so a subset measures it).
      MUSIC_PIECES=${MUSIC_PIECES:-100} REF_LIMIT=${REF_LIMIT:-500} BATCH=${BATCH:-32} \
        timeout "${CORPUS_SECONDS:-330}" bash bench/device_corpus.sh .gpu_audio
      rm -f "$OUT/nvidia_smi.csv" ;;
    curve)
      used=$(( $(date +%s) - t_start ))
      minutes=$(python3 -c "print(max(1.0, ${CURVE_MINUTES:-8.5} - $used / 60))")
      # The first evaluation compiles its programs and starts PESQ/ViSQOL: 3.4 min on
      # 2026-12-02; later ones load them from the cache (0.5 min).
      reserve=$([[ -d /tmp/qc/evals ]] && echo 1.0 || echo 3.5)
      [[ -n "${CURVE_NO_EVAL:-}" ]] && reserve=0.2
      # Autotune level 2 (initialised buffers, no correctness re-check of each candidate):
      # the level the GAN-step rows of BENCHMARKS.md were measured at, to keep compiling
      # inside a call.
      # JAX_EXPLAIN_CACHE_MISSES: the log says why a restart recompiled (BENCHMARKS §5).
      JAX_EXPLAIN_CACHE_MISSES=${JAX_EXPLAIN_CACHE_MISSES:-1} \
      XLA_FLAGS=${XLA_FLAGS:---xla_gpu_autotune_level=2} \
      python3 bench/quality_curve.py run --workdir /tmp/qc --source-dir .gpu_audio/speech \
        --data-dir /tmp/qc/tfds --steps "${CURVE_STEPS:-500,2000,5000,9000,14000}" \
        --time-limit-minutes "$minutes" --eval-reserve-minutes "$reserve" \
        --checkpoint-every 1000 ${CURVE_LAST:+--fit-last-step} ${CURVE_NO_EVAL:+--no-eval} \
        2>&1 | tee -a "$OUT/quality_curve.log"
      cp /tmp/qc/quality_curve.csv "$OUT/" 2>/dev/null
      if [[ -f /tmp/qc/quality_curve.csv ]]; then
        python3 bench/quality_curve.py plot /tmp/qc/quality_curve.csv --png "$OUT/quality_curve.png"
      fi
      # The trainer's own metrics (step time, losses, code usage) for BENCHMARKS.md.
      [[ -f /tmp/qc/train/metrics.jsonl ]] && cp /tmp/qc/train/metrics.jsonl "$OUT/train_metrics.jsonl"
      # At most 8 files come back: the evaluations' summaries and per-file tables in one tar.
      [[ -d /tmp/qc/evals ]] && tar czf "$OUT/evals.tgz" -C /tmp/qc \
        $(cd /tmp/qc && ls evals/*/summary.json evals/*/metrics.csv 2>/dev/null) ;;
    entropy)
      # Issue 17: bits per second of the trained codec's codes on the demo speech set
      # (fixed-width, adaptive and context-model entropy coding, on held-out files).
      last=$(ls /tmp/qc/exports 2>/dev/null | sort -n | tail -1)
      [[ -z "$last" ]] && { echo "no export in /tmp/qc/exports" >&2; continue; }
      rm -rf /tmp/codes
      time python3 -m codec_jax encode "/tmp/qc/exports/$last" .gpu_audio/speech -o /tmp/codes \
        --no-progress 2>&1 | tail -12
      python3 -m codec_jax entropy-fit /tmp/codes -o /tmp/entropy_model.npz \
        --report "$OUT/entropy_step$last.json" 2>&1 | tail -5 ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
