#!/usr/bin/env bash
# Demo datasets from real recordings packaged by Debian:
#   klettres-data       ~1800 short spoken letters/syllables in 20+ languages
#                       (Ogg Vorbis, 44.1 kHz, ~51 min)          -> klettres_speech_<SR>k
#   wesnoth-1.16-music  41 orchestral tracks of Battle for Wesnoth
#                       (Ogg Vorbis, 44.1 kHz stereo, ~2.1 h)    -> wesnoth_music_<SR>k
# Both are installed with apt (root or sudo needed) and prepared with
# `codec-jax prepare-data` (resampled, split 98/2 train/validation).
#
# usage: scripts/prepare_demo_data.sh [DATA_DIR]
#   DATA_DIR     TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)
# environment:
#   SAMPLE_RATE  target rate in Hz (default 24000)
#   WORKERS      decoding processes (default: nproc)
#   OVERWRITE=1  rebuild datasets that already exist
#   PYTHON       interpreter with codec_jax installed (default: python3)
set -euo pipefail

DATA_DIR="${1:-${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}}"
SAMPLE_RATE="${SAMPLE_RATE:-24000}"
WORKERS="${WORKERS:-$(nproc)}"
PYTHON="${PYTHON:-python3}"
SUFFIX="$((SAMPLE_RATE / 1000))k"

SPEECH_DIR=/usr/share/klettres
MUSIC_DIR=/usr/share/games/wesnoth/1.16/data/core/music
PACKAGES=(klettres-data wesnoth-1.16-music)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  echo "installing ${missing[*]} (about 190 MB download) ..."
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
for d in "$SPEECH_DIR" "$MUSIC_DIR"; do
  [[ -d "$d" ]] || { echo "expected audio folder $d is missing (package layout changed?)" >&2; exit 1; }
done

extra=()
[[ "${OVERWRITE:-0}" == 1 ]] && extra+=(--overwrite)

prepare() {  # name folder
  local name="$1" folder="$2"
  if [[ -f "$DATA_DIR/$name/1.0.0/dataset_info.json" && "${OVERWRITE:-0}" != 1 ]]; then
    echo "$name already prepared in $DATA_DIR (OVERWRITE=1 to rebuild)"
    return 0
  fi
  "$PYTHON" -m codec_jax prepare-data "$folder" --name "$name" --data-dir "$DATA_DIR" \
    --sample-rate "$SAMPLE_RATE" --workers "$WORKERS" "${extra[@]}"
}

prepare "klettres_speech_$SUFFIX" "$SPEECH_DIR"
prepare "wesnoth_music_$SUFFIX" "$MUSIC_DIR"

cat <<MSG

Demo datasets are in $DATA_DIR. Use them in a data config, e.g.:
  cfg.sources = [
      {"kind": "tfds", "name": "klettres_speech_$SUFFIX", "data_dir": "$DATA_DIR", "weight": 1.0},
      {"kind": "tfds", "name": "wesnoth_music_$SUFFIX", "data_dir": "$DATA_DIR", "weight": 1.0},
  ]
MSG
