"""The polyphase transposed conv's weight gradient: XLA's weight-gradient convolution
against one matmul per tap (`codec_jax.nn.layers.polyphase_weight_grad`), alone, at the
shapes of the tiny decoder's three blocks (batch 4 x 0.25 s) and of one snac_24khz-sized
block (batch 16). Median of 5 calls after one (one call when the first took over 5 s);
the relative difference of the two results.

    JAX_PLATFORMS=cpu python bench/bench_polyphase_grad.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codec_jax.nn import layers  # noqa: E402

# (batch, time, in, out x stride) of the polyphase conv (2 taps): the tiny decoder's
# blocks 0-2 (bench/profile_train_step.py --config tiny --batch 4), then a wide block.
SHAPES = [(4, 168, 128, 256), (4, 672, 64, 96), (4, 2016, 32, 32), (16, 1536, 512, 1024)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N shapes")
    args = p.parse_args(argv)
    for batch, steps, cin, cout in SHAPES[:args.shapes]:
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (batch, steps, cin))
        k = jax.random.normal(keys[1], (2, cin, cout))
        g = jax.random.normal(keys[2], (batch, steps + 1, cout))
        forms = {name: jax.jit(lambda x, k, g, f=f: jax.vjp(lambda k: f(x, k, 1, None), k)[1](g)[0])
                 for name, f in (("conv", layers._taps_conv), ("dot", layers._taps_conv_dot_grad))}
        results, times = {}, {}
        for name, fn in forms.items():
            t0 = time.perf_counter()
            results[name] = jax.block_until_ready(fn(x, k, g))
            slow = time.perf_counter() - t0 > 5.0  # then one timed call (the wide conv: ~100 s)
            runs = []
            for _ in range(1 if slow else 5):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x, k, g))
                runs.append(time.perf_counter() - t0)
            times[name] = 1e3 * float(np.median(runs))
        diff = float(jnp.abs(results["conv"] - results["dot"]).max() / jnp.abs(results["conv"]).max())
        print(f"batch {batch}, {steps} steps, {cin} -> {cout}: weight-gradient conv "
              f"{times['conv']:.2f} ms, matmuls {times['dot']:.2f} ms "
              f"({times['conv'] / times['dot']:.1f}x), relative difference {diff:.1e} "
              f"on {jax.devices()[0].device_kind}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
