"""GPU check of the fused residual unit kernel against the XLA path (issue 16).

With CHECK=1, for each (channels, dilation) of SNAC's decoders it compares
`fused_residual.fused_residual_unit` with `residual_unit_reference` on bfloat16 inputs
(with and without per-row valid lengths) and prints the largest difference and the share
of elements that differ. Then it times the XLA path and the kernel at each tile
(`STEPSxWARPS`) on one unit of the 32 kHz decoder's last block.

  CHECK=1 python bench/check_fused_residual.py 32x4 16x4 32x2 64x8
"""

from __future__ import annotations

import functools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax
import jax.numpy as jnp
import numpy as np

from codec_jax.nn import fused_residual as fr


def weights(key, channels):
    ks = jax.random.split(key, 7)
    return (0.5 + jax.random.uniform(ks[0], (channels,)), 0.3 * jax.random.normal(ks[1], (7, channels)),
            0.1 * jax.random.normal(ks[2], (channels,)), 0.5 + jax.random.uniform(ks[3], (channels,)),
            jax.random.normal(ks[4], (channels, channels)) / np.sqrt(channels),
            0.1 * jax.random.normal(ks[5], (channels,)))


def main():
    print(jax.devices())
    tiles = [tuple(int(v) for v in t.split("x")) for t in sys.argv[1:]] or [(64, 4), (32, 4)]
    cases = [(48, 3, 100), (96, 1, 1000), (96, 9, 777), (192, 3, 513), (64, 9, 300),
             (128, 1, 4096), (256, 9, 257)]
    for channels, dilation, time_steps in (cases if os.environ.get("CHECK") else []):
        x = jax.random.normal(jax.random.key(channels + dilation), (3, time_steps, channels)).astype(jnp.bfloat16)
        w = weights(jax.random.key(1), channels)
        for valid in (None, jnp.array([time_steps, time_steps // 2, 5], jnp.int32)):
            print(f"C={channels} d={dilation} T={time_steps}: compiling", flush=True)
            t0 = time.perf_counter()
            ref = jax.jit(fr.residual_unit_reference, static_argnums=7)(x, *w, dilation, valid)
            ref.block_until_ready()
            t1 = time.perf_counter()
            out = jax.jit(fr.fused_residual_unit, static_argnums=7)(x, *w, dilation, valid)
            out.block_until_ready()
            print(f"  xla {t1 - t0:.1f} s, pallas {time.perf_counter() - t1:.1f} s (first calls)", flush=True)
            d = np.abs(np.asarray(ref, np.float32) - np.asarray(out, np.float32))
            scale = float(np.abs(np.asarray(ref, np.float32)).max())
            print(f"C={channels} d={dilation} T={time_steps} valid={'yes' if valid is not None else 'no'}: "
                  f"max diff {d.max():.4g} (output max {scale:.3g}), differing {np.mean(d > 0):.2%}")
    # Speed at block 3 of the 32 kHz decoder, 11 rows (one auto pass) of 10 s.
    channels, rows, steps = 96, 11, 331776
    x = jax.random.normal(jax.random.key(0), (rows, steps, channels)).astype(jnp.bfloat16)
    w = weights(jax.random.key(1), channels)
    gb = 2 * x.size * 2 / 1e9
    for name, fn in [("xla", jax.jit(fr.residual_unit_reference, static_argnums=7)),
                     *[(f"pallas {bt}x{nw}", jax.jit(functools.partial(
                         fr.fused_residual_unit, block_time=bt, num_warps=nw), static_argnums=7))
                       for bt, nw in tiles]]:
        try:
            t0 = time.perf_counter()
            fn(x, *w, 9).block_until_ready()
            print(f"{name}: first call {time.perf_counter() - t0:.1f} s", flush=True)
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                fn(x, *w, 9).block_until_ready()
                times.append(time.perf_counter() - t0)
            t = float(np.median(times))
            print(f"{name}: {t * 1e3:.2f} ms per unit ({gb / t:.0f} GB/s of one read + one write)")
        except Exception as e:  # a tile that Triton cannot compile: report and go on
            print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")


if __name__ == "__main__":
    main()
