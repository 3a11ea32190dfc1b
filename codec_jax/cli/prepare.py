"""`codec-jax prepare-data`: flags -> `codec_jax.data.prepare.prepare_folder`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from codec_jax.data.prepare import DEFAULTS, default_data_dir, prepare_folder

_MAX_LISTED_SKIPS = 50


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="codec-jax prepare-data",
        description=(
            "Build a TFDS dataset (array_record, no TensorFlow needed) from a folder of "
            "audio files (wav, flac, ogg, opus, mp3, aiff; searched recursively). Files are "
            "resampled to --sample-rate with soxr and split into train/validation "
            "deterministically by a hash of their relative path. Unreadable, empty or "
            "corrupt files are skipped and listed in the report."
        ),
    )
    p.add_argument("source_dir", help="folder of audio files")
    p.add_argument("--name", required=True,
                   help="dataset name (lower case, digits, underscores), e.g. librispeech_24k")
    p.add_argument("--data-dir", default=None,
                   help="TFDS data dir to write into (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--sample-rate", type=int, default=DEFAULTS.sample_rate,
                   help="target rate in Hz (default %(default)s)")
    p.add_argument("--validation-fraction", type=float, default=DEFAULTS.validation_fraction,
                   help="share of files put in the validation split (default %(default)s; 0 = train only)")
    p.add_argument("--max-chunk-seconds", type=float, default=DEFAULTS.max_chunk_seconds,
                   help="cut longer files into near-equal chunks of at most this length; training "
                        "crops come from one chunk, so keep it >= the crop length (default %(default)s; 0 = never)")
    p.add_argument("--min-seconds", type=float, default=DEFAULTS.min_seconds,
                   help="skip files shorter than this (default %(default)s)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                   help="decoding processes (default: CPU count; 0 = decode in this process)")
    p.add_argument("--quality", default=DEFAULTS.resample_quality,
                   choices=["QQ", "LQ", "MQ", "HQ", "VHQ"],
                   help="soxr resampling quality (default %(default)s)")
    p.add_argument("--compression", default=DEFAULTS.compression, choices=["none", "zstd", "brotli"],
                   help="array_record record compression (default %(default)s: fastest random reads; "
                        "brotli, TFDS's default, saves ~10-40%% disk but costs ~2x CPU per read)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset of this name (kept until the new one is complete)")
    p.add_argument("--report", default=None, help="also write the build report (JSON) to this file")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    # Imported here so that `--help` stays fast.
    from codec_jax.data import folder_builder

    log = (lambda msg: None) if args.quiet else folder_builder.print_progress
    # TFDS's tqdm bars count examples per split and interleave badly with the
    # file-level progress lines printed here.
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir or default_data_dir()))
    try:
        folder_builder.validate_dataset_name(args.name)
        if not os.path.isdir(args.source_dir):
            raise ValueError(f"source folder {args.source_dir!r} does not exist")
        if args.sample_rate <= 0:
            raise ValueError(f"--sample-rate must be positive, got {args.sample_rate}")
    except ValueError as e:
        print(f"prepare-data: {e}", file=sys.stderr)
        return 2

    try:
        report = prepare_folder(
            args.source_dir,
            name=args.name,
            data_dir=data_dir,
            sample_rate=args.sample_rate,
            validation_fraction=args.validation_fraction,
            max_chunk_seconds=args.max_chunk_seconds or None,
            min_seconds=args.min_seconds,
            num_workers=args.workers,
            resample_quality=args.quality,
            compression=args.compression,
            overwrite=args.overwrite,
            progress=log,
        )
    except FileExistsError as e:
        print(f"prepare-data: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - report any build failure as one clear line
        print(f"prepare-data: build of {args.name!r} failed, nothing was written: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1

    _print_report(report, name=args.name, data_dir=data_dir)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _print_report(report: dict, *, name: str, data_dir: str) -> None:
    hours = ", ".join(f"{k}: {report['examples'][k]} examples / {h:.3f} h"
                      for k, h in report["hours"].items())
    print(f"prepared {name!r} in {report['dataset_dir']} ({report['build_seconds']:.1f} s)")
    print(f"  files: {report['files_found']} found, {report['files_used']} used, "
          f"{report['files_skipped']} skipped")
    print(f"  {hours}")
    skipped = report["skipped"]
    if skipped:
        print("  skipped files:")
        for s in skipped[:_MAX_LISTED_SKIPS]:
            print(f"    {s['path']}: {s['reason']}")
        if len(skipped) > _MAX_LISTED_SKIPS:
            print(f"    ... and {len(skipped) - _MAX_LISTED_SKIPS} more "
                  f"(all listed in {os.path.join(report['dataset_dir'], 'metadata.json')})")
    print(f"  read it with tfds.data_source({name!r}, data_dir={data_dir!r}) or the data config "
          f"source {{'kind': 'tfds', 'name': {name!r}, 'data_dir': {data_dir!r}}}")
