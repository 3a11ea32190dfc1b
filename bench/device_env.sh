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
