"""Encode/decode speed of codec_jax beside the reference PyTorch SNAC, in one process.

For each preset, batch size and dtype it times jitted JAX encode/decode and the reference
(eager and torch.compile) on the same device, on 10 s clips of noise (never zeros), and
reports x real time (audio seconds coded per wall-clock second, median of --repeats runs
after warm-up), the first call's time (compilation included) and peak device memory.

  python bench/bench_codec.py --presets snac_24khz snac_32khz snac_44khz \
      --batches 1 16 64 --dtypes float32 bfloat16 --impls jax torch_eager torch_compile

`--impls jax_lengths` times the same programs given per-row valid lengths (batch-invariant
coding: activations beyond each row's end are masked), to compare with the plain `jax` row.

Results are appended as JSON lines to --out and printed as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _median_time(fn, sync, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


_VARIABLES = {}


def _variables(config):
    import codec_jax

    if config not in _VARIABLES:
        _VARIABLES[config] = codec_jax.init_variables(config, 0)
    return _VARIABLES[config]


def bench_jax(config, batch, seconds, dtype, repeats, with_lengths=False, rows_per_call="auto"):
    """`with_lengths`: pass per-row valid lengths (rows of 100 % down to ~50 % of the width), so
    the model masks beyond each row's end (batch-invariant codes); the cost of that masking
    is this row's time against the plain `jax` row."""
    import jax
    import jax.numpy as jnp

    import codec_jax

    samples = config.padded_length(int(seconds * config.sampling_rate))
    variables = _variables(config)
    audio = jax.random.normal(jax.random.key(1), (batch, samples), jnp.float32) * 0.1
    frames = config.frames_per_level(samples)
    codes = [jax.random.randint(jax.random.key(2 + i), (batch, f), 0, config.codebook_size, jnp.int32)
             for i, f in enumerate(frames)]
    lengths = None
    if with_lengths:
        lengths = jnp.asarray([samples - i * samples // (2 * batch) for i in range(batch)], jnp.int32)
    results = {}
    for name, fn, arg in (
        ("encode", lambda a: codec_jax.encode(variables, a, config=config, dtype=dtype,
                                              lengths=lengths, rows_per_call=rows_per_call), audio),
        ("decode", lambda c: codec_jax.decode(variables, c, config=config, dtype=dtype,
                                              lengths=lengths, rows_per_call=rows_per_call), codes),
    ):
        jit_fn = codec_jax.encode if name == "encode" else codec_jax.decode
        lowered = jit_fn.lower(variables, arg, config=config, dtype=dtype, lengths=lengths,
                               rows_per_call=rows_per_call)
        t0 = time.perf_counter()
        compiled = lowered.compile()
        mem = compiled.memory_analysis()
        peak = None
        if mem is not None:
            peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                    + mem.output_size_in_bytes - mem.alias_size_in_bytes)
        jax.block_until_ready(fn(arg))
        first = time.perf_counter() - t0
        jax.block_until_ready(fn(arg))
        med, lo, hi = _median_time(lambda: fn(arg), jax.block_until_ready, repeats)
        results[name] = dict(seconds=med, min=lo, max=hi, first_call=first,
                             peak_gb=None if peak is None else peak / 1e9)
    return results, batch * samples / config.sampling_rate


def bench_torch(config, batches, seconds, dtype, repeats, compile_):
    """Times the reference on each batch size in turn, yielding (batch, results, audio_s).

    One model and, with `compile_`, one `torch.compile` wrapper per function serve every
    batch size, as a user's job would: the first batch size compiles a static graph, the
    second recompiles with the batch dimension dynamic (torch's default "automatic
    dynamic shapes"), later ones reuse that graph. Each row's first-call time says which.
    """
    import torch
    from snac import SNAC

    torch.backends.cudnn.benchmark = True
    if compile_:
        torch._dynamo.reset()  # no graphs or recompile budget carried over from the last config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SNAC(**config.to_dict()).eval().to(device)
    model.hop_length = int(model.hop_length)  # numpy int breaks dynamo guards
    samples = config.padded_length(int(seconds * config.sampling_rate))
    frames = config.frames_per_level(samples)
    amp = dtype == "bfloat16"

    def run(fn):
        # Contexts stay outside the compiled region: dynamo fails on inference_mode inside.
        fn = torch.compile(fn) if compile_ else fn

        def call(x):
            with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                return fn(x)
        return call

    encode, decode = run(model.encode), run(model.decode)

    def sync(_):
        if device == "cuda":
            torch.cuda.synchronize()

    for batch in batches:
        try:
            gen = torch.Generator(device=device).manual_seed(1)
            audio = torch.randn(batch, 1, samples, device=device, generator=gen) * 0.1
            codes = [torch.randint(0, config.codebook_size, (batch, f), device=device, generator=gen)
                     for f in frames]
            results = {}
            for name, fn, arg in (("encode", encode, audio), ("decode", decode, codes)):
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                sync(fn(arg))
                first = time.perf_counter() - t0
                sync(fn(arg))
                med, lo, hi = _median_time(lambda: fn(arg), sync, repeats)
                peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
                results[name] = dict(seconds=med, min=lo, max=hi, first_call=first, peak_gb=peak)
            del audio, codes
        except Exception as e:  # e.g. out of memory: record it and go on to the next size
            if device == "cuda":
                torch.cuda.empty_cache()
            yield batch, e, None
        else:
            yield batch, results, batch * samples / config.sampling_rate


def bench_jax_batches(config, batches, seconds, dtype, repeats, with_lengths=False,
                      rows_per_call="auto"):
    for batch in batches:
        try:
            results, audio_s = bench_jax(config, batch, seconds, dtype, repeats, with_lengths,
                                         rows_per_call)
        except Exception as e:
            yield batch, e, None
        else:
            yield batch, results, audio_s


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["snac_24khz", "snac_32khz", "snac_44khz"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--impls", nargs="+", default=["jax", "torch_eager", "torch_compile"])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench_codec.jsonl")
    p.add_argument("--layers", nargs="*", default=[], metavar="KEY=VALUE",
                   help="codec_jax lowering choices, codec_jax.nn.layers.IMPL (e.g. snake_sine=jnp "
                        "conv_transpose=xla pointwise=conv: the code before issue 16)")
    p.add_argument("--rows-per-call", default="auto",
                   help="codec_jax rows coded at once: auto, all or a number (issue 16)")
    args = p.parse_args()
    rows_per_call = {"auto": "auto", "all": None}.get(args.rows_per_call) or int(args.rows_per_call)
    from bench.xla_options import set_layers
    from codec_jax.nn import layers

    set_layers(args.layers)

    from codec_jax import get_preset

    import jax

    device = jax.devices()[0].device_kind
    rows = []
    for preset in args.presets:
        config = get_preset(preset)
        for impl in args.impls:
            for dtype in args.dtypes:
                if impl in ("jax", "jax_lengths"):  # jax_lengths: per-row valid lengths (masked)
                    runs = bench_jax_batches(config, args.batches, args.seconds, dtype, args.repeats,
                                             with_lengths=impl == "jax_lengths",
                                             rows_per_call=rows_per_call)
                else:
                    runs = bench_torch(config, args.batches, args.seconds, dtype, args.repeats,
                                       compile_=impl == "torch_compile")
                for batch, res, audio_s in runs:
                    if isinstance(res, Exception):  # e.g. out of memory: record it and go on
                        msg = f"{type(res).__name__}: {str(res).splitlines()[0][:200]}"
                        print(f"{preset} {impl} {dtype} b{batch}: FAILED {msg}", flush=True)
                        row = dict(preset=preset, impl=impl, dtype=dtype, batch=batch, error=msg)
                    else:
                        row = dict(preset=preset, impl=impl, dtype=dtype, batch=batch, device=device,
                                   audio_seconds=audio_s,
                                   rows_per_call=args.rows_per_call if impl.startswith("jax") else None,
                                   layers=dict(layers.IMPL) if impl.startswith("jax") else None,
                                   date=time.strftime("%Y-%m-%d", time.gmtime()),
                                   **{f"{k}_{m}": v for k, r in res.items() for m, v in r.items()})
                        row["encode_xrt"] = audio_s / res["encode"]["seconds"]
                        row["decode_xrt"] = audio_s / res["decode"]["seconds"]
                        print(f"{preset} {impl} {dtype} b{batch}: encode {row['encode_xrt']:.0f}x "
                              f"decode {row['decode_xrt']:.0f}x first {res['encode']['first_call']:.1f}/"
                              f"{res['decode']['first_call']:.1f}s peak {res['encode']['peak_gb']}/"
                              f"{res['decode']['peak_gb']} GB", flush=True)
                    rows.append(row)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print()
    print("| preset | impl | dtype | batch | encode xRT | decode xRT | first call enc/dec (s) | peak GB enc/dec |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['preset']} | {r['impl']} | {r['dtype']} | {r['batch']} | failed: {r['error']} | | | |")
            continue
        pk = lambda v: "n/a" if v is None else f"{v:.1f}"
        print(f"| {r['preset']} | {r['impl']} | {r['dtype']} | {r['batch']} | {r['encode_xrt']:.0f} | "
              f"{r['decode_xrt']:.0f} | {r['encode_first_call']:.1f} / {r['decode_first_call']:.1f} | "
              f"{pk(r['encode_peak_gb'])} / {pk(r['decode_peak_gb'])} |")


if __name__ == "__main__":
    main()
