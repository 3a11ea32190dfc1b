"""Split one jitted encode/decode into lowering, compilation and run time (diagnosis aid).

  python bench/profile_one.py snac_24khz 16 float32 default
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import codec_jax  # noqa: E402


def main():
    preset, batch, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    precision = sys.argv[4] if len(sys.argv) > 4 else "default"
    seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 10.0
    config = codec_jax.get_preset(preset)
    t = time.perf_counter()
    variables = codec_jax.init_variables(config, 0)
    jax.block_until_ready(variables)
    print(f"init {time.perf_counter() - t:.1f}s", flush=True)
    samples = config.padded_length(int(seconds * config.sampling_rate))
    audio = jax.random.normal(jax.random.key(1), (batch, samples)) * 0.1
    codes = [jax.random.randint(jax.random.key(2), (batch, f), 0, config.codebook_size, jnp.int32)
             for f in config.frames_per_level(samples)]
    with jax.default_matmul_precision(precision):
        for name, fn, arg in (("encode", codec_jax.encode, audio), ("decode", codec_jax.decode, codes)):
            t = time.perf_counter()
            lowered = fn.lower(variables, arg, config=config, dtype=dtype)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            jax.block_until_ready(compiled(variables, arg))
            t3 = time.perf_counter()
            runs = []
            for _ in range(3):
                s = time.perf_counter()
                jax.block_until_ready(compiled(variables, arg))
                runs.append(time.perf_counter() - s)
            audio_s = batch * samples / config.sampling_rate
            print(f"{preset} b{batch} {dtype} {precision} {name}: lower {t1 - t:.1f}s compile {t2 - t1:.1f}s "
                  f"first run {t3 - t2:.2f}s runs {[round(r * 1000, 1) for r in runs]} ms "
                  f"-> {audio_s / min(runs):.0f}x real time", flush=True)


if __name__ == "__main__":
    main()
