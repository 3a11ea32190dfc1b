"""CPU cost of the corpus job's reader (`codec_jax.audio.io.read_audio`: decode, mix,
resample) against the same work with the file opened twice (`sf.info`, then `sf.read`: the
reader before 2026-12-04), alternating over rounds (issue 10: the GPU job is bound by its
readers' CPU).

    python bench/bench_reader.py FOLDER --rate 24000 --files 600 --rounds 3

Both paths are checked to give the same samples first. Reported: process CPU seconds per
round, and CPU seconds per hour of audio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from codec_jax.audio import io  # noqa: E402


def two_opens(path: str, rate: int) -> np.ndarray:
    info = sf.info(path)
    data, _ = sf.read(path, dtype="float32", always_2d=True)
    if not np.all(np.isfinite(data)):
        raise ValueError(path)
    if data.shape[1] > 1:
        data = data.mean(axis=1, keepdims=True)
    return io.resample(data, int(info.samplerate), rate, "HQ")


def one_open(path: str, rate: int) -> np.ndarray:
    return io.read_audio(path, target_sample_rate=rate, mix=True, dtype="float32").pcm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--rate", type=int, default=24000)
    p.add_argument("--files", type=int, default=600)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    files = sorted(str(f) for f in Path(args.folder).rglob("*")
                   if f.suffix.lower() in (".ogg", ".wav", ".flac", ".mp3"))[:args.files]
    if not files:
        raise SystemExit(f"no audio files under {args.folder}")
    hours = 0.0
    for f in files:
        a, b = two_opens(f, args.rate), one_open(f, args.rate)
        if not np.array_equal(a.reshape(-1), b.reshape(-1)):
            raise SystemExit(f"the two paths differ on {f}")
        hours += b.shape[0] / args.rate / 3600
    results = {"two opens (before)": [], "one open (read_audio)": []}
    paths = [("two opens (before)", two_opens), ("one open (read_audio)", one_open)]
    for r in range(args.rounds):
        for name, fn in (paths if r % 2 == 0 else paths[::-1]):
            t = time.process_time()
            for f in files:
                fn(f, args.rate)
            results[name].append(time.process_time() - t)
    print(f"{len(files)} files, {hours * 60:.1f} min of audio, same samples on both paths")
    for name, times in results.items():
        med = float(np.median(times))
        print(f"  {name:24s} CPU s per round {', '.join(f'{t:.3f}' for t in times)}; "
              f"median {med / hours:.1f} CPU-s per audio hour")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
