"""`codec-jax eval MODEL INPUT... --out REPORT_DIR`: the flags of `codec_jax.evaluation`.

Importing this module (and `--help`) does not import JAX.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from codec_jax.errors import UsageError

_DESCRIPTION = """\
Code audio files with a codec and measure the reconstructions: mel and STFT distance,
SI-SDR, PESQ wide-band, STOI and ViSQOL per file (metrics.csv), means/medians/95 %
intervals and codebook usage (summary.json), and a report (report.html, PNGs) with
spectrograms, histograms, quality vs decoder levels and audio of the best, median and
worst file. Definitions: docs/evaluation.md."""


def _levels(text: str) -> list[int]:
    if text == "full":
        return []  # only all levels
    try:
        levels = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated level counts, got {text!r}") from None
    if not levels:
        raise argparse.ArgumentTypeError("no level counts given")
    return levels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codec-jax eval", description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="SNAC directory, a directory from `codec-jax convert` or a "
                                 "training export, or a preset name")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="audio files, directories (searched recursively) or @list.txt "
                        "(one path per line), as encode-corpus takes them")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=8, help="files coded per device call")
    p.add_argument("--levels", type=_levels, default=None,
                   help="decoder level counts to measure, e.g. 1,2 (default: every count "
                        "from 1 to all levels; 'full': all levels only, which are always measured)")
    p.add_argument("--no-pesq", dest="pesq", action="store_false", help="skip PESQ")
    p.add_argument("--no-stoi", dest="stoi", action="store_false", help="skip STOI")
    p.add_argument("--no-visqol", dest="visqol", action="store_false", help="skip ViSQOL")
    p.add_argument("--visqol-mode", default="auto", choices=["auto", "audio", "speech"],
                   help="ViSQOL 'audio' (music, 48 kHz) or 'speech' (16 kHz); auto: speech for "
                        "codecs at <= 24 kHz, audio above")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for PESQ/STOI/ViSQOL (default: all cores; 0: in this process)")
    p.add_argument("--rank-by", default="mel_distance",
                   help="metric that picks the report's best/median/worst files")
    p.add_argument("--save-audio", action="store_true",
                   help="write every reconstruction to REPORT_DIR/audio/")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="only metrics.csv and summary.json (no plots, no HTML)")
    p.add_argument("--bootstrap-resamples", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if (out / "summary.json").exists() and not args.overwrite:
        raise UsageError(f"{out} already holds a report; pass --overwrite to replace it")

    from codec_jax import evaluation
    from codec_jax.api import load_pretrained

    evaluation.expand_inputs(args.inputs)  # bad paths fail before the model loads
    try:
        codec = load_pretrained(args.model, dtype=args.dtype)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    settings = evaluation.EvalSettings(
        batch_size=args.batch_size, levels=args.levels, pesq=args.pesq, stoi=args.stoi,
        visqol=args.visqol, visqol_mode=args.visqol_mode, workers=args.workers,
        rank_by=args.rank_by, save_audio=args.save_audio, bootstrap_resamples=args.bootstrap_resamples,
        seed=args.seed, report=args.report, progress=not args.quiet)
    summary = evaluation.evaluate_codec(codec, args.inputs, out, model_name=args.model, settings=settings)
    print(evaluation.format_summary(summary))
    print(f"report: {os.path.join(out, 'report.html' if args.report else 'summary.json')}")
    return 0
