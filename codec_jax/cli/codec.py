"""Command-line tools: `codec-jax encode | decode | roundtrip | convert`.

Files are read with soundfile (wav/flac/ogg/mp3), mixed to mono and resampled with soxr
to the model's rate. Long files are coded in chunks (a multiple of the model's padding
unit) so memory stays bounded; outputs are written to a temporary file and renamed, so an
interrupted or failed run never leaves a truncated file, and existing files are only
replaced with --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _read_audio(path: str, sample_rate: int) -> np.ndarray:
    """-> float32 mono `[samples]` at `sample_rate`."""
    import soundfile as sf
    import soxr

    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for unreadable input
        raise SystemExit(f"codec-jax: cannot read {path}: {e}") from None
    if data.shape[0] == 0:
        raise SystemExit(f"codec-jax: {path} has no samples")
    mono = data.mean(axis=1)
    if not np.all(np.isfinite(mono)):
        raise SystemExit(f"codec-jax: {path} contains NaN or infinite samples")
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ").astype(np.float32)
    return mono


def _atomic_write(target: Path, overwrite: bool, write) -> None:
    if target.exists() and not overwrite:
        raise SystemExit(f"codec-jax: {target} exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_audio(target: Path, audio: np.ndarray, sample_rate: int, overwrite: bool) -> None:
    import soundfile as sf

    fmt = target.suffix.lstrip(".").upper() or "WAV"
    _atomic_write(target, overwrite, lambda tmp: sf.write(tmp, audio, sample_rate, format=fmt))


def _chunk_samples(codec, chunk_seconds: float) -> int:
    unit = codec.config.pad_multiple
    return max(unit, int(chunk_seconds * codec.config.sampling_rate) // unit * unit)


def encode_array(codec, audio: np.ndarray, chunk_seconds: float = 30.0, progress: bool = True):
    """Mono `[samples]` -> list of int32 `[frames_level]` per level, coding in chunks."""
    chunk = _chunk_samples(codec, chunk_seconds)
    pieces = []
    starts = range(0, len(audio), chunk)
    t0 = time.perf_counter()
    for i, start in enumerate(starts):
        codes = codec.encode(audio[None, start:start + chunk])
        pieces.append([np.asarray(c[0]) for c in codes])
        if progress and len(starts) > 1:
            done = min(start + chunk, len(audio)) / codec.config.sampling_rate
            rate = done / (time.perf_counter() - t0)
            print(f"\r  encoded {done:8.1f} s of {len(audio) / codec.config.sampling_rate:.1f} s "
                  f"({rate:.1f} x real time)", end="", file=sys.stderr, flush=True)
    if progress and len(starts) > 1:
        print(file=sys.stderr)
    return [np.concatenate(level) for level in zip(*pieces)]


def decode_array(codec, codes, length: int, chunk_seconds: float = 30.0, rng=None) -> np.ndarray:
    """Codes per level -> mono `[length]`, decoding in the same chunks `encode_array` used."""
    import jax

    chunk = _chunk_samples(codec, chunk_seconds)
    hop = codec.config.hop_length
    out = []
    for i, start in enumerate(range(0, codec.config.padded_length(length), chunk)):
        frames = [slice(start // hop // s, (start + chunk) // hop // s) for s in codec.config.vq_strides]
        part = [c[None, f] for c, f in zip(codes, frames)]
        key = None if rng is None else jax.random.fold_in(rng, i)
        out.append(np.asarray(codec.decode(part, rng=key))[0])
    return np.concatenate(out)[:length]


def _model_arg(parser):
    parser.add_argument("model", help="SNAC directory, a directory from `codec-jax convert`, or a preset")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk-seconds", type=float, default=30.0,
                        help="code long files in chunks of this length (bounded memory)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def encode_main(argv):
    p = argparse.ArgumentParser(prog="codec-jax encode", description="audio file(s) -> codes (.npz)")
    _model_arg(p)
    p.add_argument("inputs", nargs="+", help="audio files")
    p.add_argument("-o", "--output-dir", required=True, help="one <name>.npz per input")
    args = p.parse_args(argv)
    import codec_jax
    from codec_jax.nn.quantizer import bitrate

    codec = codec_jax.load_pretrained(args.model, dtype=args.dtype)
    for path in args.inputs:
        audio = _read_audio(path, codec.sample_rate)
        t0 = time.perf_counter()
        codes = encode_array(codec, audio, args.chunk_seconds)
        seconds = len(audio) / codec.sample_rate
        target = Path(args.output_dir) / (Path(path).stem + ".npz")
        payload = {f"codes_{i}": c for i, c in enumerate(codes)}
        payload["length"] = np.int64(len(audio))
        payload["config"] = np.array(json.dumps(codec.config.to_dict()))
        payload["chunk_seconds"] = np.float64(args.chunk_seconds)
        _atomic_write(target, args.overwrite, lambda tmp: np.savez(open(tmp, "wb"), **payload))
        print(f"{path}: {seconds:.2f} s -> {target} "
              f"({', '.join(str(len(c)) for c in codes)} frames, "
              f"{bitrate(codec.config, quantizer=codec.quantizer) / 1000:.2f} kbps, "
              f"{time.perf_counter() - t0:.2f} s)")
    return 0


def decode_main(argv):
    p = argparse.ArgumentParser(prog="codec-jax decode", description="codes (.npz) -> audio file")
    _model_arg(p)
    p.add_argument("codes", help=".npz written by `codec-jax encode`")
    p.add_argument("-o", "--output", required=True, help="audio file (.wav, .flac, .ogg)")
    p.add_argument("--noise-seed", type=int, default=None,
                   help="sample the decoder's noise blocks with this seed (default: no noise)")
    args = p.parse_args(argv)
    import jax

    import codec_jax
    from codec_jax.config import SNACConfig

    codec = codec_jax.load_pretrained(args.model, dtype=args.dtype)
    with np.load(args.codes) as data:
        stored = SNACConfig.from_dict(json.loads(str(data["config"])))
        if stored != codec.config:
            raise SystemExit(f"codec-jax: {args.codes} was made by a model with config {stored}, "
                             f"not {codec.config}")
        codes = [data[f"codes_{i}"] for i in range(codec.config.n_levels) if f"codes_{i}" in data]
        length = int(data["length"])
        chunk_seconds = float(data["chunk_seconds"])
    rng = None if args.noise_seed is None else jax.random.key(args.noise_seed)
    audio = decode_array(codec, codes, length, chunk_seconds, rng)
    _write_audio(Path(args.output), audio, codec.sample_rate, args.overwrite)
    print(f"{args.codes} -> {args.output} ({length / codec.sample_rate:.2f} s)")
    return 0


def roundtrip_main(argv):
    p = argparse.ArgumentParser(prog="codec-jax roundtrip",
                                description="encode + decode an audio file and report quality")
    _model_arg(p)
    p.add_argument("input", help="audio file")
    p.add_argument("-o", "--output", required=True, help="reconstructed audio file")
    args = p.parse_args(argv)
    import codec_jax
    from codec_jax.nn.quantizer import bitrate

    codec = codec_jax.load_pretrained(args.model, dtype=args.dtype)
    audio = _read_audio(args.input, codec.sample_rate)
    t0 = time.perf_counter()
    codes = encode_array(codec, audio, args.chunk_seconds)
    t1 = time.perf_counter()
    out = decode_array(codec, codes, len(audio), args.chunk_seconds)
    t2 = time.perf_counter()
    _write_audio(Path(args.output), out, codec.sample_rate, args.overwrite)
    seconds = len(audio) / codec.sample_rate
    err = out - audio
    snr = 10 * np.log10(np.sum(audio ** 2) / max(np.sum(err ** 2), 1e-20))
    print(f"{args.input}: {seconds:.2f} s at {codec.sample_rate} Hz, "
          f"{bitrate(codec.config, quantizer=codec.quantizer) / 1000:.2f} kbps; "
          f"encode {t1 - t0:.2f} s, decode {t2 - t1:.2f} s "
          f"(first calls include compilation); SNR {snr:.2f} dB -> {args.output}")
    return 0


def convert_main(argv):
    p = argparse.ArgumentParser(prog="codec-jax convert",
                                description="SNAC checkpoint directory -> orbax directory")
    p.add_argument("snac_dir", help="directory with config.json and pytorch_model.bin / model.safetensors")
    p.add_argument("output_dir")
    args = p.parse_args(argv)
    import codec_jax

    codec = codec_jax.load_pretrained(args.snac_dir)
    codec.save(args.output_dir)
    print(f"{args.snac_dir} -> {args.output_dir}")
    return 0
