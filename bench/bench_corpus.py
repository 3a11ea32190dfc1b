"""End-to-end corpus tokenization: `codec_jax.corpus.encode_corpus` beside the reference loop.

Both sides do the whole job on the same real files, on the same device, in the same dtype,
with the same weights: read (soundfile), mix to mono, resample (soxr HQ) to the model's
rate, encode, write the codes. The reference is pip `snac` used as its README shows, file
by file: `model.encode(audio[None, None])` under `torch.inference_mode()` (bf16 through
autocast on CUDA), codes saved with `np.save`.

    python bench/make_corpus.py /tmp/corpus --speech-files 150 --music-pieces 50
    python bench/bench_corpus.py /tmp/corpus --preset snac_24khz --dtype float32 \
        --limit 200 --out bench_corpus.json

Reported (JSON to --out, summary to stdout):
  * audio hours per device hour (= x real time / 1) and x real time for each side, and the
    ratio; codec_jax both cold (first job in the process: compilation included) and warm
    (the same job again with `overwrite`: programs already compiled, as every job after
    the first hour of a 10 000-hour run sees);
  * where the time goes: host decode and resample (CPU seconds, measured file by file in
    the reference loop, the same work the job's workers do), transfer and compute per batch
    shape (timed alone on a batch of each shape the job ran, times the batches it ran), the
    job's own waits (for the readers, for the device) and writing;
  * device utilisation = compute seconds / wall seconds of the warm job;
  * code agreement between the two on the files both coded (a sanity check, not parity:
    bf16 and padding near-ties differ).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _files(folder: str, limit: int | None):
    from codec_jax import corpus
    from codec_jax.audio import io as audio_io

    files = corpus.collect_inputs([folder], audio_io.SOUNDFILE_EXTENSIONS)
    if limit and len(files) > limit:
        # An even spread over the sorted list keeps the speech/music mix of the folder.
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def _model_dir(preset: str, seed: int, path: str) -> str:
    import torch
    from snac import SNAC

    from codec_jax import get_preset

    config = get_preset(preset).to_dict()
    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    torch.save(SNAC(**config).state_dict(), os.path.join(path, "pytorch_model.bin"))
    return path


def run_reference(model_dir: str, files, out_dir: str, dtype: str, device: str):
    """The README loop, timed per stage."""
    import soundfile as sf
    import soxr
    import torch
    from snac import SNAC

    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    model = SNAC(**config)
    model.load_state_dict(torch.load(os.path.join(model_dir, "pytorch_model.bin")))
    model = model.eval().to(device)
    sr = config["sampling_rate"]
    t = {"decode": 0.0, "resample": 0.0, "encode": 0.0, "write": 0.0}
    seconds = 0.0
    codes_out = {}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bfloat16"
                and device == "cuda" else None)
    t_start = time.perf_counter()
    for item in files:
        t0 = time.perf_counter()
        try:
            data, rate = sf.read(item.path, dtype="float32", always_2d=True)
        except Exception:
            continue
        t1 = time.perf_counter()
        mono = data.mean(axis=1)
        if rate != sr:
            mono = soxr.resample(mono, rate, sr, quality="HQ").astype(np.float32)
        t2 = time.perf_counter()
        audio = torch.from_numpy(mono).to(device)
        with torch.inference_mode():
            if autocast is not None:
                with autocast:
                    codes = model.encode(audio[None, None])
            else:
                codes = model.encode(audio[None, None])
        codes = [c[0].cpu().numpy() for c in codes]  # waits for the device
        t3 = time.perf_counter()
        target = os.path.join(out_dir, item.relpath + ".npz")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        np.savez(target, *codes)
        t4 = time.perf_counter()
        t["decode"] += t1 - t0
        t["resample"] += t2 - t1
        t["encode"] += t3 - t2
        t["write"] += t4 - t3
        seconds += len(mono) / sr
        codes_out[item.relpath] = codes
    wall = time.perf_counter() - t_start
    return {"audio_seconds": seconds, "wall_seconds": wall, "x_real_time": seconds / wall,
            "files": len(codes_out), "timings": t}, codes_out


def _calibrate(codec, report, devices):
    """Transfer and compute seconds of one batch of each shape the job ran."""
    import ast

    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from codec_jax import corpus

    mesh = Mesh(np.asarray(devices), ("batch",))
    sharding = NamedSharding(mesh, P("batch"))
    fn = corpus._jitted("encode", codec.config, codec.dtype, codec.quantizer)
    variables = jax.device_put(codec.variables, NamedSharding(mesh, P()))
    out = {}
    transfer = compute = 0.0
    for shapes, count in report.batches.items():
        (b, n), _ = ast.literal_eval(shapes)
        audio = (np.random.default_rng(0).normal(size=(b, n)) * 0.1).astype(np.float32)
        lengths = np.full((b,), n, np.int32)
        times_t, times_c = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            a = jax.block_until_ready(jax.device_put(audio, sharding))
            ln = jax.block_until_ready(jax.device_put(lengths, sharding))
            t1 = time.perf_counter()
            jax.block_until_ready(fn(variables, a, ln))
            t2 = time.perf_counter()
            times_t.append(t1 - t0)
            times_c.append(t2 - t1)
        tt, tc = float(np.median(times_t)), float(np.median(times_c))
        out[shapes] = {"batches": count, "transfer_s": tt, "compute_s": tc}
        transfer += count * tt
        compute += count * tc
    return out, transfer, compute


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--preset", default="snac_24khz")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--limit", type=int, default=None, help="files (spread over the folder)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--window-seconds", type=float, default=20.0)
    p.add_argument("--buckets", type=int, default=5)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    p.add_argument("--format", default="files", choices=["files", "shards"])
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--reference-limit", type=int, default=None,
                   help="the reference codes only this many of the files (spread evenly); "
                        "ratios compare x real time")
    p.add_argument("--out", default=None, help="JSON results")
    p.add_argument("--workdir", default=None, help="where outputs go (default: a temp dir)")
    args = p.parse_args(argv)

    import jax
    import torch

    import codec_jax
    from codec_jax import corpus

    work = args.workdir or tempfile.mkdtemp(prefix="bench_corpus_")
    files = _files(args.folder, args.limit)
    model_dir = _model_dir(args.preset, 0, os.path.join(work, "model"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    devices = jax.local_devices()
    result = {
        "preset": args.preset, "dtype": args.dtype, "files": len(files),
        "jax_device": str(devices[0].device_kind), "jax_devices": len(devices),
        "torch_device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "host_cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
        "options": {k: getattr(args, k) for k in ("batch_size", "window_seconds", "buckets",
                                                  "workers", "format")},
    }
    codec = codec_jax.load_pretrained(model_dir, dtype=args.dtype)
    options = corpus.EncodeOptions(
        output_dir=os.path.join(work, "codes"), format=args.format, batch_size=args.batch_size,
        window_seconds=args.window_seconds, buckets=args.buckets, workers=args.workers,
        progress=False)
    quiet = lambda s: None  # noqa: E731
    cold = corpus.encode_corpus(codec, args.preset, files, options, log=quiet)
    warm = corpus.encode_corpus(codec, args.preset, files,
                                corpus.EncodeOptions(**{**options.__dict__, "overwrite": True}),
                                log=quiet)
    per_shape, transfer, compute = _calibrate(codec, warm, devices)
    result["codec_jax"] = {
        "cold": {"x_real_time": cold.x_real_time, "wall_seconds": cold.wall_seconds,
                 "compiled_programs": cold.compiled_programs},
        "warm": warm.to_json(),
        "audio_hours": warm.audio_seconds / 3600,
        "audio_hours_per_device_hour": warm.x_real_time / max(1, len(devices)),
        "per_batch_shape": per_shape,
        "transfer_seconds": transfer, "compute_seconds": compute,
        "device_utilisation": compute / warm.wall_seconds,
        "failed": len(warm.failed),
    }
    line = (f"codec_jax: {warm.audio_seconds / 3600:.3f} h in {warm.wall_seconds:.1f} s = "
            f"{warm.x_real_time:.1f}x real time warm ({cold.x_real_time:.1f}x cold, "
            f"{cold.compiled_programs} programs); device busy {compute / warm.wall_seconds:.0%}")
    print(line, flush=True)

    def save():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)

    save()  # the codec_jax half survives a time limit hit during the reference loop
    if not args.no_reference:
        ref_files = files
        if args.reference_limit and len(files) > args.reference_limit:
            step = len(files) / args.reference_limit
            ref_files = [files[int(i * step)] for i in range(args.reference_limit)]
        ref, ref_codes = run_reference(model_dir, ref_files, os.path.join(work, "reference"),
                                       args.dtype, device)
        result["reference"] = ref
        result["ratio_warm"] = warm.x_real_time / ref["x_real_time"]
        result["ratio_cold"] = cold.x_real_time / ref["x_real_time"]
        same = total = 0
        for item in ref_files[:50]:
            if item.relpath not in ref_codes:
                continue
            ours = codec_jax.load_codes(corpus.codes_path(options.output_dir, item.relpath)) \
                if args.format == "files" else None
            if ours is None:
                break
            for a, b in zip(ours.codes, ref_codes[item.relpath]):
                n = min(a.shape[-1], b.shape[-1])
                same += int(np.sum(a[..., :n] == b[..., :n]))
                total += n
        result["code_agreement_first_50_files"] = same / total if total else None
        print(f"reference: {ref['audio_seconds'] / 3600:.3f} h in {ref['wall_seconds']:.1f} s = "
              f"{ref['x_real_time']:.1f}x real time; ratio {result['ratio_warm']:.2f} warm, "
              f"{result['ratio_cold']:.2f} cold; reference stages {ref['timings']}")
    print(f"codec_jax job timings (s): {warm.timings}; transfer {transfer:.2f} s, "
          f"compute {compute:.2f} s")
    save()
    return result


if __name__ == "__main__":
    main()
