"""Input-pipeline throughput in audio-seconds per second.

Measures `codec_jax.data.pipeline.create_train_iterator` (random crops,
silence check, channel handling, loudness/gain/polarity, batching) for
several worker counts, on:
  * a generated array_record dataset (always; built here from synthetic
    signals written as 16-bit WAV files, 8 s each, through prepare-data);
  * any prepared datasets named with --datasets (e.g. the demo data of
    scripts/prepare_demo_data.sh);
  * the synthetic source (--synthetic).
A raw `tfds.data_source` random-read rate (records/s, one thread, no crop) is
printed next to each dataset for reference.

Example:
  python bench/bench_loader.py --workers 0 1 2 \\
      --data-dir ~/tensorflow_datasets --datasets klettres_speech_24k wesnoth_music_24k

Load average is printed before and after each measurement: on a shared
machine other processes lower the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codec_jax.data import pipeline, prepare, synthetic  # noqa: E402


def make_generated_dataset(data_dir: str, *, files: int, seconds: float, sample_rate: int) -> str:
    """Writes `files` synthetic 16-bit WAVs and prepares them as 'bench_generated'."""
    import soundfile as sf

    name = "bench_generated"
    if os.path.isfile(os.path.join(data_dir, name, "1.0.0", "dataset_info.json")):
        return name
    with tempfile.TemporaryDirectory(prefix="bench_loader_src_") as src:
        kinds = tuple(k for k in synthetic.KINDS if k != "silence")
        stream = synthetic.synthetic_stream(1234, sample_rate=sample_rate, seconds=seconds, kinds=kinds)
        for i in range(files):
            sf.write(os.path.join(src, f"g{i:04d}.wav"), next(stream), sample_rate, subtype="PCM_16")
        prepare.prepare_folder(src, name=name, data_dir=data_dir, sample_rate=sample_rate,
                               validation_fraction=0.0, num_workers=0)
    return name


def raw_reads_per_s(name: str, data_dir: str, seconds: float = 3.0) -> float:
    import tensorflow_datasets as tfds

    src = tfds.data_source(name, data_dir=data_dir)["train"]
    rng = np.random.default_rng(0)
    for _ in range(20):
        src[int(rng.integers(len(src)))]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        src[int(rng.integers(len(src)))]
        n += 1
    return n / (time.perf_counter() - t0)


def measure(sources, *, workers: int, read_threads: int, batch: int, crop_seconds: float,
            sample_rate: int, seconds: float, warmup_batches: int) -> dict:
    cfg = pipeline.default_data_config()
    cfg.sources = sources
    cfg.sample_rate = sample_rate
    cfg.crop_seconds = crop_seconds
    cfg.num_workers = workers
    cfg.read_threads = read_threads
    t_start = time.perf_counter()
    it = pipeline.create_train_iterator(cfg, global_batch_size=batch, seed=0)
    try:
        for _ in range(warmup_batches):  # includes worker start-up
            next(it)
        startup = time.perf_counter() - t_start
        load_before = os.getloadavg()[0]
        n, t0 = 0, time.perf_counter()
        cpu0 = time.process_time()
        while time.perf_counter() - t0 < seconds:
            b = next(it)
            n += b["audio"].shape[0]
        elapsed = time.perf_counter() - t0
        main_cpu = time.process_time() - cpu0
    finally:
        it.close()
    return {
        "workers": workers,
        "read_threads": read_threads,
        "audio_s_per_s": n * crop_seconds / elapsed,
        "batches": n // batch,
        "startup_s": startup,
        "main_process_cpu_s_per_audio_s": main_cpu / (n * crop_seconds),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="TFDS data dir of --datasets (default: TFDS default)")
    p.add_argument("--datasets", nargs="*", default=[], help="prepared dataset names to measure")
    p.add_argument("--generated-dir", default=None,
                   help="where to build/reuse the generated dataset (default: a temp dir)")
    p.add_argument("--generated-files", type=int, default=300, help="generated WAV files (8 s each)")
    p.add_argument("--no-generated", action="store_true", help="skip the generated dataset")
    p.add_argument("--synthetic", action="store_true", help="also measure the synthetic source")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--read-threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--crop-seconds", type=float, default=1.0)
    p.add_argument("--sample-rate", type=int, default=24000)
    p.add_argument("--seconds", type=float, default=15.0, help="measurement time per configuration")
    p.add_argument("--warmup-batches", type=int, default=5)
    p.add_argument("--json", default=None, help="also write results as JSON here")
    args = p.parse_args(argv)

    data_dir = os.path.abspath(os.path.expanduser(args.data_dir or prepare.default_data_dir()))
    targets = []  # (label, sources, name, data_dir)
    tmp = None
    if not args.no_generated:
        gen_dir = args.generated_dir
        if gen_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="bench_loader_tfds_")
            gen_dir = tmp.name
        t0 = time.perf_counter()
        name = make_generated_dataset(gen_dir, files=args.generated_files, seconds=8.0,
                                      sample_rate=args.sample_rate)
        print(f"generated dataset ready in {time.perf_counter() - t0:.1f} s ({gen_dir})", flush=True)
        targets.append((f"{name} (array_record)", [{"kind": "tfds", "name": name, "data_dir": gen_dir}],
                        name, gen_dir))
    for name in args.datasets:
        targets.append((name, [{"kind": "tfds", "name": name, "data_dir": data_dir}], name, data_dir))
    if len(args.datasets) > 1:
        targets.append((" + ".join(args.datasets),
                        [{"kind": "tfds", "name": n, "data_dir": data_dir} for n in args.datasets], None, None))
    if args.synthetic:
        targets.append(("synthetic", [{"kind": "synthetic"}], None, None))

    print(f"{platform.node()}  cpus={os.cpu_count()}  python {platform.python_version()}  "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"crop {args.crop_seconds} s @ {args.sample_rate} Hz, batch {args.batch}, "
          f"read_threads {args.read_threads}, {args.seconds:.0f} s per row\n")
    print("| source | workers | audio-s/s | raw reads/s (1 thread) | start-up s | load avg before/after |")
    print("|---|---|---|---|---|---|")
    results = []
    for label, sources, name, ddir in targets:
        raw = raw_reads_per_s(name, ddir) if name else None
        for w in args.workers:
            r = measure(sources, workers=w, read_threads=args.read_threads, batch=args.batch,
                        crop_seconds=args.crop_seconds, sample_rate=args.sample_rate,
                        seconds=args.seconds, warmup_batches=args.warmup_batches)
            r.update(source=label, raw_reads_per_s=raw)
            results.append(r)
            print(f"| {label} | {w} | {r['audio_s_per_s']:.0f} | "
                  f"{'' if raw is None else f'{raw:.0f}'} | {r['startup_s']:.1f} | "
                  f"{r['load_before']:.1f} / {r['load_after']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
