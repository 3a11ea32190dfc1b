"""Does the threefry GPU kernel (`train.threefry_gpu_kernel_init`, i.e.
`jax_threefry_gpu_kernel_lowering`) leave the initial train state as it was?

Builds the state of one config twice in this process, with the kernel lowering and with
the unrolled XLA lowering, and compares every parameter and codebook leaf: how many are
bit-equal, and the largest difference relative to the leaf's scale. The random bits are
the same by construction (one algorithm, two lowerings); the floating-point code around
them (weight norms, the erfinv of normal draws) is compiled in two programs and may
round differently in the last bit.

    python bench/check_threefry_init.py --config snac_24khz [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="snac_24khz")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from bench_cold_start import load_config
    from codec_jax.training import loop

    jax.config.update("jax_enable_compilation_cache", False)
    states, seconds = {}, {}
    for kernel in (True, False):
        config = load_config(args.config, [f"train.threefry_gpu_kernel_init={kernel}"])
        setup = loop.create_training_setup(config)
        t0 = time.perf_counter()
        state = jax.block_until_ready(setup.init_state())
        seconds[kernel] = time.perf_counter() - t0
        states[kernel] = jax.device_get((state.gen_params, state.disc_params, state.codebook))
        print(f"threefry kernel={kernel}: state init {seconds[kernel]:.1f} s", flush=True)

    with_paths = jax.tree_util.tree_flatten_with_path(states[True])[0]
    others = jax.tree_util.tree_leaves(states[False])
    equal, worst, rows = 0, (0.0, ""), []
    for (path, a), b in zip(with_paths, others):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise SystemExit(f"shape mismatch at {jax.tree_util.keystr(path)}")
        if np.array_equal(a, b):
            equal += 1
            continue
        scale = max(float(np.max(np.abs(a))), 1e-30)
        rel = float(np.max(np.abs(a - b))) / scale
        rows.append((rel, jax.tree_util.keystr(path)))
        worst = max(worst, (rel, jax.tree_util.keystr(path)))
    total = len(with_paths)
    print(f"{equal}/{total} leaves bit-equal; largest difference {worst[0]:.3g} of the "
          f"leaf's max |value| ({worst[1] or '-'})")
    for rel, name in sorted(rows, reverse=True)[:10]:
        print(f"  {rel:.3g}  {name}")
    result = dict(config=args.config, device=jax.devices()[0].device_kind,
                  leaves=total, bit_equal=equal, max_relative_difference=worst[0],
                  worst_leaf=worst[1], init_seconds={str(k): v for k, v in seconds.items()})
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
