"""Where decode time and memory go, and what each lowering choice buys (issue 16).

For one preset, batch, clip length and dtype it compiles `codec_jax.decode` once per
variant, in one process on one device, and reports the first call (compilation included),
the compiled program's peak memory (XLA's memory analysis: arguments + outputs +
temporaries) and x real time (median of --repeats runs). A variant is
`CONV_TRANSPOSE/POINTWISE/ROWS[/KEY=VALUE,...]`:

- CONV_TRANSPOSE: how the decoder's upsampling convs are lowered
  (`codec_jax.nn.layers.IMPL["conv_transpose"]`): `xla` or `polyphase`;
- POINTWISE: the 1x1 convs as `conv` or `dot`; `dot+bf16ew` (or `conv+bf16ew`) computes Snake and the depthwise taps in the
  activation dtype op by op (the code before issue 16) instead of float32; `+jnpsin`
  computes Snake's sin^2 with `jnp.sin` instead of `layers.sin_squared`;
- `+pallas` (or `+pallasTxW`: tile of T steps, W warps) runs the residual units as
  `codec_jax.nn.fused_residual`'s Triton kernel; `+stack` (`+stackTxW`) runs each block's
  three units as its stack form (`fused_residual_stack`);
- ROWS: `rows_per_call` of `codec_jax.decode`: `all`, `auto` or a number;
- KEY=VALUE[,KEY=VALUE]: XLA compile options for this compilation only, e.g.
  `autotune=N` (`xla_gpu_autotune_level`) or `xla_gpu_experimental_max_unroll_factor=8`
  (default: XLA's).

`--trace VARIANT` also records one run of that variant with the JAX profiler and prints the
device time per XLA operation (from the Perfetto trace), the longest first.

  python bench/profile_decode.py --preset snac_32khz --batch 64 --dtype bfloat16 \
      --variants xla/conv/all polyphase/conv/all polyphase/dot/auto --trace xla/conv/all
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.trace_ops import device_time_by_op  # noqa: E402
from bench.xla_options import parse_options  # noqa: E402


def parse_variant(text: str) -> dict:
    parts = text.split("/")
    if len(parts) not in (3, 4):
        raise SystemExit(f"variant {text!r}: want CONV_TRANSPOSE/POINTWISE/ROWS[/KEY=VALUE,...]")
    rows = None if parts[2] == "all" else ("auto" if parts[2] == "auto" else int(parts[2]))
    options = (parse_options(parts[3], aliases={"autotune": "xla_gpu_autotune_level"})
               if len(parts) == 4 else {})
    flags = parts[1].split("+")
    pointwise, bf16_elementwise, jnp_sine = flags[0], "bf16ew" in flags, "jnpsin" in flags
    # +pallas: the fused residual unit kernel; +pallasTxW: with block_time T, W warps;
    # +stack, +stackTxW: the stack form (`fused_residual_stack`: a block's three units).
    pallas = [f for f in flags if f.startswith(("pallas", "stack"))]
    tuning = {}
    kind = "pallas_stack" if pallas and pallas[0].startswith("stack") else "pallas"
    if pallas and pallas[0] not in ("pallas", "stack"):
        block_time, _, warps = pallas[0][len(kind.split("_")[-1]):].partition("x")
        tuning = {"block_time": int(block_time), "num_warps": int(warps)}
    return dict(name=text, conv_transpose=parts[0], pointwise=pointwise,
                elementwise_f32=not bf16_elementwise,
                snake_sine="jnp" if jnp_sine else "polynomial",
                residual_unit=kind if pallas else "xla", tuning=tuning, rows=rows,
                options=options)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="snac_32khz")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--variants", nargs="+", default=["xla/conv/all", "polyphase/conv/all"])
    p.add_argument("--trace", nargs="*", default=[])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--hlo-dir", default=None, help="write each traced variant's optimized HLO here")
    p.add_argument("--out", default="profile_decode.jsonl")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    import codec_jax
    from codec_jax.nn import fused_residual, layers

    config = codec_jax.get_preset(args.preset)
    variables = codec_jax.init_variables(config, 0)
    samples = config.padded_length(int(args.seconds * config.sampling_rate))
    codes = [jax.random.randint(jax.random.key(2 + i), (args.batch, f), 0, config.codebook_size,
                                jnp.int32) for i, f in enumerate(config.frames_per_level(samples))]
    audio_s = args.batch * samples / config.sampling_rate
    device = jax.devices()[0].device_kind
    reference = None
    for text in args.variants:
        v = parse_variant(text)
        layers.set_lowering(conv_transpose=v["conv_transpose"], pointwise=v["pointwise"],
                            elementwise_f32=v["elementwise_f32"], snake_sine=v["snake_sine"],
                            residual_unit=v["residual_unit"])
        fused_residual.TUNING.update(fused_residual.DEFAULT_TUNING, **v["tuning"])
        fused_residual.STACK_TUNING.update(fused_residual.DEFAULT_STACK_TUNING, **v["tuning"])
        t0 = time.perf_counter()
        lowered = codec_jax.decode.lower(variables, codes, config=config, dtype=args.dtype,
                                         rows_per_call=v["rows"])
        try:
            compiled = lowered.compile(compiler_options=v["options"] or None)
        except Exception as e:  # an unknown or unsupported XLA option: report, go on
            print(json.dumps(dict(variant=text, error=f"{type(e).__name__}: {e}"[:400])), flush=True)
            continue
        out = jax.block_until_ready(compiled(variables, codes))
        first = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes) / 1e9 if mem is not None else None
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(compiled(variables, codes))
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        if reference is None:
            reference = out
        diff = float(jnp.abs(out - reference).max())
        row = dict(variant=text, preset=args.preset, batch=args.batch, seconds=args.seconds,
                   dtype=args.dtype, device=device, first_call_s=round(first, 2),
                   peak_gb=None if peak is None else round(peak, 2), median_s=med,
                   min_s=min(times), max_s=max(times), xrt=round(audio_s / med, 1),
                   max_abs_diff_vs_first_variant=diff,
                   date=time.strftime("%Y-%m-%d", time.gmtime()))
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        if text in args.trace:
            if args.hlo_dir:
                os.makedirs(args.hlo_dir, exist_ok=True)
                name = text.replace("/", "_").replace("=", "")
                with gzip.open(os.path.join(args.hlo_dir, f"{name}.hlo.txt.gz"), "wt") as f:
                    f.write(compiled.as_text())
            with tempfile.TemporaryDirectory() as d:
                with jax.profiler.trace(d, create_perfetto_trace=True):
                    for _ in range(2):
                        jax.block_until_ready(compiled(variables, codes))
                ops = device_time_by_op(d, 0)
            whole = sum(ms for _, ms, _ in ops)
            print(f"--- device time by op, {text}, 2 runs ({whole:.1f} ms in all):")
            for name, ms, n in ops[:args.top]:
                print(f"{ms:9.2f} ms {100 * ms / max(whole, 1e-9):5.1f} % x{n:<4d} {name[:150]}")


if __name__ == "__main__":
    main()
