"""A folder of audio files -> a named TFDS dataset (the library side of `codec-jax
prepare-data`, whose flags live in `codec_jax/cli/prepare.py`).

Example:
  codec-jax prepare-data /data/LibriSpeech --name librispeech_24k \\
      --data-dir ~/tensorflow_datasets --sample-rate 24000 --workers 2

writes `~/tensorflow_datasets/librispeech_24k/1.0.0/` (array_record shards,
`train` and `validation` splits), readable with
`tfds.data_source("librispeech_24k", data_dir="~/tensorflow_datasets")` and by
`{"kind": "tfds", "name": "librispeech_24k", ...}` in a data config.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time


@dataclasses.dataclass(frozen=True)
class BuildDefaults:
    """The defaults of a folder build, shared by `codec-jax prepare-data`'s flags,
    `prepare_folder` and `folder_builder.AudioFolderBuilder` (this module imports no TFDS,
    so the CLI's `--help` stays fast)."""

    sample_rate: int = 24000
    validation_fraction: float = 0.02
    max_chunk_seconds: float | None = 5.0
    min_seconds: float = 0.1
    resample_quality: str = "HQ"
    compression: str = "none"


DEFAULTS = BuildDefaults()


def default_data_dir() -> str:
    """Where TFDS itself looks when no data_dir is given."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def prepare_folder(
    source_dir: str,
    *,
    name: str,
    data_dir: str,
    sample_rate: int = DEFAULTS.sample_rate,
    validation_fraction: float = DEFAULTS.validation_fraction,
    max_chunk_seconds: float | None = DEFAULTS.max_chunk_seconds,
    min_seconds: float = DEFAULTS.min_seconds,
    num_workers: int = 0,
    resample_quality: str = DEFAULTS.resample_quality,
    compression: str = DEFAULTS.compression,
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
