"""GPU check of the fused residual kernels against the XLA path (issue 16).

With CHECK=1, for each (channels, dilation) of SNAC's decoders it compares
`fused_residual.fused_residual_unit` with `residual_unit_reference`, and
`fused_residual_stack` (a block's three units, dilations 1, 3, 9) with
`residual_stack_reference`, on bfloat16 inputs (with and without per-row valid lengths),
and prints the largest difference and the share of elements that differ. Then it times
the XLA path and the kernels at each tile on the 32 kHz decoder's last two blocks
(11 rows x 331776 steps x 96 channels, 11 x 165888 x 192): `STEPSxWARPS` times the unit
kernel on one unit (dilation 9), `sSTEPSxWARPS` the stack form on the three units.

  CHECK=1 python bench/check_fused_residual.py 32x4 s64x4 s128x4 s64x8
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


def timed(fn, *args) -> tuple[float, float]:
    """(first call s, median of 10 calls s)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def compare(name, ref, out) -> None:
    d = np.abs(np.asarray(ref, np.float32) - np.asarray(out, np.float32))
    scale = float(np.abs(np.asarray(ref, np.float32)).max())
    print(f"{name}: max diff {d.max():.4g} (output max {scale:.3g}), differing {np.mean(d > 0):.2%}",
          flush=True)


def main():
    print(jax.devices())
    tiles = [t for t in sys.argv[1:]] or ["32x4", "s64x4"]
    parse = lambda t: tuple(int(v) for v in t.lstrip("s").split("x"))
    unit_tiles = [parse(t) for t in tiles if not t.startswith("s")]
    stack_tiles = [parse(t) for t in tiles if t.startswith("s")]
    cases = [(48, 3, 100), (96, 1, 1000), (96, 9, 777), (192, 3, 513), (64, 9, 300),
             (128, 1, 4096), (256, 9, 257)]
    for channels, dilation, time_steps in (cases if os.environ.get("CHECK") else []):
        x = jax.random.normal(jax.random.key(channels + dilation), (3, time_steps, channels)).astype(jnp.bfloat16)
        w = weights(jax.random.key(1), channels)
        units = tuple(weights(jax.random.key(k), channels) for k in (1, 2, 3))
        for valid in (None, jnp.array([time_steps, time_steps // 2, 5], jnp.int32)):
            tag = f"C={channels} d={dilation} T={time_steps} valid={'yes' if valid is not None else 'no'}"
            ref = jax.jit(fr.residual_unit_reference, static_argnums=7)(x, *w, dilation, valid)
            out = jax.jit(fr.fused_residual_unit, static_argnums=7)(x, *w, dilation, valid)
            compare(f"unit {tag}", ref, out)
            ref = jax.jit(fr.residual_stack_reference, static_argnums=2)(x, units, (1, 3, 9), valid)
            out = jax.jit(fr.fused_residual_stack, static_argnums=2)(x, units, (1, 3, 9), valid)
            compare(f"stack {tag} (dilations 1, 3, 9)", ref, out)
    # Speed at the 32 kHz decoder's last two blocks, 11 rows (one auto pass) of 10 s.
    for channels, steps in ((96, 331776), (192, 165888)):
        x = jax.random.normal(jax.random.key(0), (11, steps, channels)).astype(jnp.bfloat16)
        w = weights(jax.random.key(1), channels)
        units = tuple(weights(jax.random.key(k), channels) for k in (1, 2, 3))
        gb = 2 * x.size * 2 / 1e9
        runs = [("xla unit", jax.jit(fr.residual_unit_reference, static_argnums=7), (x, *w, 9), 1),
                *[(f"pallas unit {bt}x{nw}", jax.jit(functools.partial(
                    fr.fused_residual_unit, block_time=bt, num_warps=nw), static_argnums=7),
                   (x, *w, 9), 1) for bt, nw in unit_tiles],
                ("xla stack", jax.jit(fr.residual_stack_reference, static_argnums=2),
                 (x, units, (1, 3, 9)), 3),
                *[(f"pallas stack {bt}x{nw}", jax.jit(functools.partial(
                    fr.fused_residual_stack, block_time=bt, num_warps=nw), static_argnums=2),
                   (x, units, (1, 3, 9)), 3) for bt, nw in stack_tiles]]
        for name, fn, args, n_units in runs:
            try:
                first, t = timed(fn, *args)
                print(f"C={channels} T={steps} {name}: first call {first:.1f} s, {t * 1e3:.2f} ms "
                      f"({t * 1e3 / n_units:.2f} ms per unit, {gb * n_units / t:.0f} GB/s of one "
                      f"read + one write per unit)", flush=True)
            except Exception as e:  # a tile that Triton cannot compile: report and go on
                print(f"C={channels} {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")


if __name__ == "__main__":
    main()
