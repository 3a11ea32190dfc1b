"""`codec-jax prepare-data`: a folder of audio files -> a named TFDS dataset.

Example:
  codec-jax prepare-data /data/LibriSpeech --name librispeech_24k \\
      --data-dir ~/tensorflow_datasets --sample-rate 24000 --workers 2

writes `~/tensorflow_datasets/librispeech_24k/1.0.0/` (array_record shards,
`train` and `validation` splits), readable with
`tfds.data_source("librispeech_24k", data_dir="~/tensorflow_datasets")` and by
`{"kind": "tfds", "name": "librispeech_24k", ...}` in a data config.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

_MAX_LISTED_SKIPS = 50


def default_data_dir() -> str:
    """Where TFDS itself looks when no data_dir is given."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


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
    p.add_argument("--sample-rate", type=int, default=24000, help="target rate in Hz (default 24000)")
    p.add_argument("--validation-fraction", type=float, default=0.02,
                   help="share of files put in the validation split (default 0.02; 0 = train only)")
    p.add_argument("--max-chunk-seconds", type=float, default=5.0,
                   help="cut longer files into near-equal chunks of at most this length; training "
                        "crops come from one chunk, so keep it >= the crop length (default 5; 0 = never)")
    p.add_argument("--min-seconds", type=float, default=0.1,
                   help="skip files shorter than this (default 0.1)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                   help="decoding processes (default: CPU count; 0 = decode in this process)")
    p.add_argument("--quality", default="HQ", choices=["QQ", "LQ", "MQ", "HQ", "VHQ"],
                   help="soxr resampling quality (default HQ)")
    p.add_argument("--compression", default="none", choices=["none", "zstd", "brotli"],
                   help="array_record record compression (default none: fastest random reads; "
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


def prepare_folder(
    source_dir: str,
    *,
    name: str,
    data_dir: str,
    sample_rate: int = 24000,
    validation_fraction: float = 0.02,
    max_chunk_seconds: float | None = 5.0,
    min_seconds: float = 0.1,
    num_workers: int = 0,
    resample_quality: str = "HQ",
    compression: str = "none",
    overwrite: bool = False,
    progress=None,
) -> dict:
    """Builds `data_dir/name/<version>` from `source_dir`; returns the report dict.

    With `overwrite`, an existing dataset is moved aside, and restored if the
    new build fails, so that a failed rebuild never destroys a good dataset.

    Raises:
      FileExistsError: the dataset exists and `overwrite` is False.
    """
    from codec_jax.data import folder_builder

    version_dir = os.path.join(data_dir, name, folder_builder.VERSION)
    backup = None
    if os.path.exists(version_dir):
        if not overwrite:
            raise FileExistsError(
                f"dataset {name!r} already exists at {version_dir}; pass --overwrite to rebuild it"
            )
        backup = f"{version_dir}.old-{os.getpid()}"
        os.rename(version_dir, backup)
    name_dir_existed = os.path.isdir(os.path.join(data_dir, name))
    t0 = time.monotonic()
    exclude: dict[str, str] = {}
    try:
        while True:
            # TFDS wants a download folder even though nothing is downloaded;
            # keep it out of data_dir.
            with tempfile.TemporaryDirectory(prefix="codec_jax_prepare_") as dl_dir:
                builder = folder_builder.make_builder(
                    name,
                    source_dir=source_dir,
                    data_dir=data_dir,
                    sample_rate=sample_rate,
                    validation_fraction=validation_fraction,
                    max_chunk_seconds=max_chunk_seconds,
                    min_seconds=min_seconds,
                    num_workers=num_workers,
                    resample_quality=resample_quality,
                    compression=compression,
                    exclude=exclude,
                    progress=progress,
                )
                try:
                    builder.download_and_prepare(download_dir=dl_dir)
                    break
                except folder_builder.EmptySplitError as e:
                    new_bad = {p: r for p, r in e.skipped if p not in exclude}
                    if not new_bad:
                        raise
                    # Rare (tiny folders): every file hashed into one split
                    # was bad. The split is redrawn among the other files.
                    exclude.update(new_bad)
                    if progress:
                        progress(f"{e}; rebuilding without the {len(exclude)} bad file(s)")
    except BaseException:
        if backup is not None:
            shutil.rmtree(version_dir, ignore_errors=True)
            os.rename(backup, version_dir)
        elif not name_dir_existed:
            # TFDS creates data_dir/name before its incomplete folder; do not
            # leave that empty shell behind.
            shutil.rmtree(os.path.join(data_dir, name), ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    report = builder.report.to_json()
    report.update(
        name=name, data_dir=data_dir, dataset_dir=version_dir,
        sample_rate=sample_rate, build_seconds=round(time.monotonic() - t0, 2),
    )
    return report


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
