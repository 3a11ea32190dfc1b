# Sourced by the bench/device_*.sh drivers on a lent GPU machine:
#   source bench/device_env.sh WHEEL_DIR...
# exports the environment every run wants (no XLA preallocation, unbuffered output so
# that a killed part still shows its lines, protobuf's version check off for the
# carried tensorflow-metadata), installs the carried wheels --no-deps into /tmp/site
# and puts the repository and /tmp/site on PYTHONPATH.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export TEMPORARILY_DISABLE_PROTOBUF_VERSION_CHECK=true
_wheels=()
for _dir in "$@"; do _wheels+=("$_dir"/*.whl); done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "${_wheels[@]}" || exit 1
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader

# variant_tree NAME: /tmp/ab_NAME, a copy of this tree's codec_jax/ and bench/ with the
# files under bench/ab_variants/NAME/ laid over it (the variants of the A/B drivers,
# bench/device_loop_ab.sh and bench/device_corpus_ab.sh); fails if that folder is missing.
variant_tree() {
  local tree=/tmp/ab_$1
  [[ -d bench/ab_variants/$1 ]] || { echo "no bench/ab_variants/$1" >&2; return 1; }
  rm -rf "$tree" && mkdir -p "$tree" && cp -r codec_jax bench "$tree"/ \
    && cp -r "bench/ab_variants/$1"/. "$tree"/
}
