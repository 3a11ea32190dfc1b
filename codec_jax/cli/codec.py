"""Command-line tools: `codec-jax encode | decode | roundtrip | convert`.

Flags only: the work is `codec_jax.corpus` (batched corpus jobs) and
`codec_jax.audio.codes_file` (the `.snac` format, docs/codes_format.md). Nothing here
imports JAX before the arguments are parsed, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="SNAC directory, a directory from `codec-jax convert`, or a preset")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (parameters stay float32)")


def _batch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batching")
    g.add_argument("--batch-size", type=int, default=16,
                   help="clips per batch at the longest bucket; shorter buckets take "
                        "proportionally more, so every batch holds the same audio (default 16)")
    g.add_argument("--window-seconds", type=float, default=20.0,
                   help="longest bucket; longer audio is coded as overlapping windows of "
                        "this length whose codes equal whole-file coding (default 20)")
    g.add_argument("--buckets", type=int, default=5,
                   help="padded lengths, halving from --window-seconds; also the most "
                        "programs compiled (default 5)")
    g.add_argument("--max-devices", type=int, default=None,
                   help="use at most this many local devices (default: all)")
    d = p.add_argument_group("multi-host (jax.distributed)")
    d.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (cluster auto-detection); every "
                        "process takes a disjoint share of the files")
    d.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    d.add_argument("--num-processes", type=int, default=None)
    d.add_argument("--process-id", type=int, default=None)


def _init_distributed(args) -> None:
    explicit = args.coordinator_address is not None or args.num_processes is not None
    if not (args.distributed or explicit):
        return
    import jax

    if explicit:
        if None in (args.coordinator_address, args.num_processes, args.process_id):
            from codec_jax.errors import UsageError

            raise UsageError("--coordinator-address, --num-processes and --process-id go together")
        # CPU processes need a collectives backend for the coordination barrier.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes, process_id=args.process_id)
    else:
        jax.distributed.initialize()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's kill, `timeout`) unwinds like Ctrl-C, so the job removes its
    temporary files instead of dying mid-write."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _load_model(model: str, dtype: str):
    import codec_jax
    from codec_jax.errors import UsageError

    try:
        return codec_jax.load_pretrained(model, dtype=dtype)
    except FileNotFoundError as e:
        raise UsageError(str(e).strip("'\"")) from None


def _entropy_option(value):
    """--entropy / --entropy-model -> None, "adaptive" or a loaded ContextModel."""
    if value is None or value == "adaptive":
        return value
    from codec_jax.audio.entropy import ContextModel
    from codec_jax.errors import UsageError

    if not os.path.exists(value):
        raise UsageError(f"--entropy: {value!r} is neither 'adaptive' nor an existing context model file")
    return ContextModel.load(value)


def _model_name(model: str) -> str:
    return os.path.basename(os.path.normpath(model))


def encode_main(argv):
    p = argparse.ArgumentParser(
        prog="codec-jax encode",
        description="audio files -> codes: one .snac file per input (mirroring the inputs' "
                    "relative paths) or array_record shards; resumable, bad files skipped "
                    "and reported (exit status 1 if any failed)")
    _model_args(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="audio file, directory (recursive) or @list.txt (one path per line)")
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--format", choices=["files", "shards"], default="files",
                   help="files: OUTDIR/<relpath>.snac; shards: array_record shards + index + "
                        "manifest.json for language-model training")
    p.add_argument("--channels", choices=["mix", "separate"], default="mix",
                   help="mix: average channels to mono; separate: one code stream per channel")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="decode/resample processes (0: in the main process)")
    p.add_argument("--shard-size", type=int, default=1024, help="records per shard")
    p.add_argument("--entropy", default=None, metavar="adaptive|MODEL.npz",
                   help="entropy-code the codes (lossless): 'adaptive' needs nothing else; a "
                        "context model from `codec-jax entropy-fit` codes smaller and must be "
                        "given to decode too (docs/codes_format.md)")
    p.add_argument("--resample-quality", default="HQ", choices=["QQ", "LQ", "MQ", "HQ", "VHQ"])
    p.add_argument("--overwrite", action="store_true",
                   help="code again files (or this process's shards) that are already done")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _batch_args(p)
    args = p.parse_args(argv)

    from codec_jax import corpus
    from codec_jax.audio import io as audio_io

    files = corpus.collect_inputs(args.inputs, audio_io.SOUNDFILE_EXTENSIONS)
    if not files:
        from codec_jax.errors import UsageError

        raise UsageError(f"no audio files in {' '.join(args.inputs)}")
    with _sigterm_as_interrupt():
        _init_distributed(args)
        codec = _load_model(args.model, args.dtype)
        options = corpus.EncodeOptions(
            output_dir=args.output_dir, format=args.format, channels=args.channels,
            batch_size=args.batch_size, window_seconds=args.window_seconds, buckets=args.buckets,
            workers=args.workers, overwrite=args.overwrite, shard_size=args.shard_size,
            resample_quality=args.resample_quality, progress=not args.no_progress,
            max_devices=args.max_devices, entropy=_entropy_option(args.entropy))
        report = corpus.encode_corpus(codec, _model_name(args.model), files, options)
    print(report.summary(), file=sys.stderr)
    return 1 if report.failed else 0


def decode_main(argv):
    p = argparse.ArgumentParser(
        prog="codec-jax decode",
        description="codes (.snac) -> audio at the model's rate, mirroring the codes' relative "
                    "paths; refuses codes made by another model unless --force")
    _model_args(p)
    p.add_argument("codes", nargs="+", metavar="CODES",
                   help=".snac file, directory (recursive) or @list.txt")
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--audio-format", default=None,
                   help="output extension (wav, flac, ogg, mp3, aiff); default: the source's")
    p.add_argument("--force", action="store_true",
                   help="decode codes made by another model of the same architecture")
    p.add_argument("--entropy-model", default=None, metavar="MODEL.npz",
                   help="the context model context-coded codes were written with")
    p.add_argument("--overwrite", action="store_true", help="replace existing audio files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _batch_args(p)
    args = p.parse_args(argv)

    from codec_jax import corpus
    from codec_jax.audio import codes_file

    corpus.check_audio_format(args.audio_format)  # before loading anything
    files = corpus.collect_inputs(args.codes, (codes_file.SUFFIX,))
    with _sigterm_as_interrupt():
        _init_distributed(args)
        codec = _load_model(args.model, args.dtype)
        options = corpus.DecodeOptions(
            output_dir=args.output_dir, audio_format=args.audio_format,
            batch_size=args.batch_size, window_seconds=args.window_seconds, buckets=args.buckets,
            overwrite=args.overwrite, force=args.force, progress=not args.no_progress,
            max_devices=args.max_devices,
            entropy_model=_entropy_option(args.entropy_model) if args.entropy_model else None)
        report = corpus.decode_corpus(codec, files, options)
    print(report.summary(), file=sys.stderr)
    return 1 if report.failed else 0


def roundtrip_main(argv):
    p = argparse.ArgumentParser(prog="codec-jax roundtrip",
                                description="encode + decode an audio file and report quality")
    _model_args(p)
    p.add_argument("input", help="audio file")
    p.add_argument("-o", "--output", required=True, help="reconstructed audio file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    import time

    import numpy as np
    import soundfile as sf

    from codec_jax import corpus
    from codec_jax.audio import io as audio_io
    from codec_jax.errors import UsageError, WorkError
    from codec_jax.nn.quantizer import bitrate  # per-level codebook sizes included

    out_ext = corpus.check_audio_format(os.path.splitext(args.output)[1] or ".wav")
    if os.path.exists(args.output) and not args.overwrite:
        raise UsageError(f"{args.output} exists; pass --overwrite to replace it")
    codec = _load_model(args.model, args.dtype)
    try:
        audio = audio_io.read_audio(args.input, target_sample_rate=codec.sample_rate,
                                    dtype="float32", mix=True).pcm[:, 0]
    except audio_io.AudioReadError as e:
        raise WorkError(str(e)) from None
    t0 = time.perf_counter()
    codes = codec.encode(audio[None])
    codes = [np.asarray(c) for c in codes]
    t1 = time.perf_counter()
    out = np.asarray(codec.decode(codes, length=len(audio)))[0]
    t2 = time.perf_counter()
    with audio_io.atomic_output(args.output) as tmp:
        sf.write(tmp, out, codec.sample_rate, format=corpus.WRITABLE_EXTENSIONS[out_ext])
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
