"""grain input pipeline: weighted source mixture -> crops -> augmentation -> batches.

    sources (TFDS datasets prepared by `codec-jax prepare-data`, synthetic)
      -> per process: records [process_index::process_count]   (multi-host sharding)
      -> shuffle (new order each epoch), repeat forever         (train only)
      -> random crop of `crop_seconds`, retried away from near-silence
         (crops below `silence_threshold_db` after `crop_attempts` tries are dropped)
      -> channels -> mono, resample if the dataset's rate differs
      -> loudness normalisation, random gain, random polarity, peak limit
      -> weighted mixture of the sources
      -> batch [local_batch, crop_samples] -> worker processes / prefetch

Everything before batching is a `grain.MapDataset`, i.e. a pure function of
the element index (random ops draw from `(seed, index)`), so the iterator state
is a few integers: `get_state()` / `set_state()` (or orbax via
`grain.checkpoint.CheckpointSave/Restore`) resume on exactly the next batch.
Restore with the same config, seed, batch size, process layout and
`num_workers`; grain documents that filtering (here: dropped silent crops)
makes the element order depend on the number of worker processes.

Quick start (no data on disk):

    cfg = default_data_config()                      # synthetic source
    it = create_train_iterator(cfg, global_batch_size=8, seed=0)
    batch = next(it)                                 # {"audio": float32 [8, 24000]}
    state = it.get_state()                           # save; it.set_state(state) resumes
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from codec_jax.data import synthetic

_EPS = 1e-12
# Synthetic kinds used by default in pipelines: pure silence would always be
# dropped by the near-silence filter, so generating it is wasted work.
_PIPELINE_SYNTHETIC_KINDS = tuple(k for k in synthetic.KINDS if k != "silence")
# Stream ids keep train and eval synthetic signals disjoint.
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


def default_data_config() -> ml_collections.ConfigDict:
    """Data config with every field the pipeline reads.

    sources / eval_sources entries:
      {"kind": "synthetic", "weight": 1.0}                      optional: "seed", "kinds", "seconds"
      {"kind": "tfds", "name": "librispeech_24k", "data_dir": "~/tensorflow_datasets",
       "split": "train", "weight": 1.0}                         optional: "audio_key", "sample_rate",
                                                                "cache_dir" (overrides cfg.cache_dir)
    Eval TFDS sources default to split "validation".
    """
    c = ml_collections.ConfigDict()
    c.sample_rate = 24000              # Hz of the produced audio
    c.crop_seconds = 1.0               # crop length; crop_samples = round(crop_seconds * sample_rate)
    c.sources = [{"kind": "synthetic", "weight": 1.0}]
    c.eval_sources = [{"kind": "synthetic", "weight": 1.0}]
    c.num_workers = 0                  # grain worker processes (0: in the training process)
    c.prefetch = 2                     # batches buffered per worker (or by the prefetch thread)
    c.read_threads = 2                 # threads reading/cropping records in each process
    c.silence_threshold_db = -50.0     # crops with RMS below this (dBFS) are re-drawn
    c.crop_attempts = 8                # re-draws before a record's crop is dropped
    c.target_loudness_db = -20.0       # RMS dBFS after normalisation; None disables it
    c.max_peak = 0.99                  # gains are limited so |audio| <= this
    c.random_gain_db = 6.0             # uniform gain in [-x, +x] dB after normalisation (train only)
    c.random_polarity = True           # multiply by -1 with probability 1/2 (train only)
    c.channel_mode = "mix"             # multi-channel -> mono: "mix" (mean), "first", "random";
                                       # "keep": `channels` channels (a multi-channel model)
    c.channels = 1                     # channels per example with channel_mode "keep": audio
                                       # [crop, channels]; mono sources are duplicated, extra
                                       # channels dropped, synthetic sources are panned mixes
    c.shuffle_seed = 0                 # record order + synthetic stream; None: the iterator seed
    c.synthetic_kinds = list(_PIPELINE_SYNTHETIC_KINDS)
    c.with_metadata = False            # add "source_index"/"record_index" [batch] to batches
    c.cache_dir = ""                   # local copies of TFDS data_dirs on gs:// (or any URL):
                                       # "" = $CODEC_JAX_DATA_CACHE or ~/.cache/codec_jax/tfds
    return c


# --------------------------------------------------------------------------- sources


def _as_dict(spec: Any) -> dict:
    if isinstance(spec, ml_collections.ConfigDict):
        return spec.to_dict()
    if isinstance(spec, Mapping):
        return dict(spec)
    raise TypeError(f"a data source must be a dict, got {type(spec).__name__}: {spec!r}")


def _derive_seed(*parts: int) -> int:
    """A 32-bit seed from several ints (grain wants seeds in [0, 2**32))."""
    return int(np.random.SeedSequence([int(p) % (2**63) for p in parts]).generate_state(1)[0])


def _prepare_hint(name: str, data_dir: str) -> str:
    return (f"prepare it with:\n  codec-jax prepare-data /path/to/audio/folder --name {name} "
            f"--data-dir {data_dir}\n(see docs/data.md)")


def open_tfds_source(name: str, data_dir: str | None = None, split: str = "train", *,
                     cache_dir: str | None = None):
    """`tfds.data_source(name, data_dir)[split]` with errors that say what to do.

    A remote `data_dir` (`gs://BUCKET/tfds`, `s3://...`, any URL) is read from a local
    copy of the dataset's version directory under `cache_dir` (default
    `$CODEC_JAX_DATA_CACHE` or `~/.cache/codec_jax/tfds`), made on the first use and
    reused while it matches the remote files: array_record cannot read `gs://`
    (`codec_jax/data/staging.py`). Local data dirs are read in place.

    Returns:
      a grain-compatible random-access source of records (dicts).

    Raises:
      FileNotFoundError: no prepared dataset `name` under `data_dir` (the
        message lists the datasets that are there and the prepare command).
      ValueError: the split does not exist.
      OSError: a remote dataset does not fit in the free space of `cache_dir`.
    """
    import tensorflow_datasets as tfds  # heavy import, only when a TFDS source is used

    from codec_jax.data.prepare import default_data_dir
    from codec_jax.paths import as_path, is_remote

    data_dir = as_path(data_dir or default_data_dir())  # local or gs://
    base = name.split(":", 1)[0]
    ds_dir = data_dir / base
    has_version = ds_dir.is_dir() and any(
        (v / "dataset_info.json").is_file() for v in ds_dir.iterdir())
    if not has_version:
        present = sorted(
            d.name for d in (data_dir.iterdir() if data_dir.is_dir() else [])
            if not d.name.startswith(".") and d.name != "downloads" and d.is_dir()
        )
        raise FileNotFoundError(
            f"TFDS dataset {name!r} not found in data_dir {data_dir} (no {ds_dir}/<version>/"
            f"dataset_info.json). Datasets there: {present or 'none'}. " + _prepare_hint(base, data_dir)
        )
    read_dir, read_name = str(data_dir), name
    if is_remote(data_dir):
        from codec_jax.data import staging

        versions = [v.name for v in ds_dir.iterdir() if (v / "dataset_info.json").is_file()]
        version = name.split(":", 1)[1] if ":" in name else staging.latest_version(versions)
        if version not in versions:
            raise FileNotFoundError(
                f"TFDS dataset {name!r}: no version {version} in {ds_dir} (versions there: "
                f"{sorted(versions)})")
        read_dir = staging.local_mirror(data_dir, cache_dir)
        staging.stage_version_dir(ds_dir / version, os.path.join(read_dir, base, version))
        read_name = f"{base}:{version}"
    sources = tfds.data_source(read_name, data_dir=read_dir)
    if split not in sources:
        raise ValueError(
            f"TFDS dataset {name!r} in {data_dir} has no split {split!r} (it has {sorted(sources)}); "
            "datasets prepared with --validation-fraction 0 have no 'validation' split"
        )
    return sources[split]


class _AttachIndex:
    """Records the element's index in its source (before sharding/shuffling).

    Repeated datasets pass indices past the end (epoch * length + i); the
    source wraps them, so the record index is taken modulo the length too.
    """

    def __init__(self, length: int):
        self.length = length

    def __call__(self, index: int, record: dict) -> dict:
        record = dict(record)
        record["_record_index"] = index % self.length
        return record


def _source_dataset(
    spec: dict, cfg, *, train: bool, process_index: int, process_count: int, seed: int
) -> tuple[grain.MapDataset, int | None]:
    """One source as an (infinite) MapDataset of records; also its fixed rate or None."""
    kind = spec.get("kind")
    if kind == "synthetic":
        src = synthetic.SyntheticAudioSource(
            sample_rate=cfg.sample_rate,
            channels=int(cfg.channels) if cfg.channel_mode == "keep" else 1,
            seconds=float(spec.get("seconds", cfg.crop_seconds)),
            # Different seeds per (stream, seed) keep train and eval disjoint.
            seed=int(spec.get("seed", _derive_seed(seed, _TRAIN_STREAM if train else _EVAL_STREAM))),
            kinds=tuple(spec.get("kinds", cfg.synthetic_kinds)),
        )
        ds = grain.MapDataset.source(src).map_with_index(_AttachIndex(len(src)))
        # Already random by index: sharding by index gives each process its own signals.
        return ds[process_index::process_count], cfg.sample_rate
    if kind == "tfds":
        if "name" not in spec:
            raise ValueError(f"tfds source needs a 'name': {spec}")
        split = spec.get("split", "train" if train else "validation")
        src = open_tfds_source(spec["name"], spec.get("data_dir"), split,
                               cache_dir=spec.get("cache_dir") or cfg.get("cache_dir") or None)
        n = len(src)
        if n < process_count:
            raise ValueError(
                f"TFDS dataset {spec['name']!r} split {split!r} has {n} records, fewer than "
                f"{process_count} processes: some processes would get no data"
            )
        ds = grain.MapDataset.source(src).map_with_index(_AttachIndex(n))
        # Records (not crops) are split between processes: disjoint and
        # deterministic, no coordination needed.
        ds = ds[process_index::process_count]
        if train:
            ds = ds.shuffle(seed=seed)  # reshuffled each epoch by grain
        return ds.repeat(), spec.get("sample_rate")
    raise ValueError(f"unknown data source kind {kind!r} in {spec}; use 'synthetic' or 'tfds'")


# --------------------------------------------------------------------------- crop + augment


def _to_float(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.int16:
        return x.astype(np.float32) * np.float32(1 / 32768)
    if x.dtype == np.int32:
        return x.astype(np.float32) * np.float32(1 / 2147483648)
    return x.astype(np.float32, copy=False)


def _rms_db(x: np.ndarray) -> float:
    """RMS level in dBFS of float `[samples]` or `[samples, channels]` (a BLAS dot: ~10x
    faster than mean(x**2))."""
    x = x.reshape(-1)
    return 10.0 * math.log10(float(np.dot(x, x)) / max(x.shape[0], 1) + _EPS)


class CropAndAugment:
    """record -> `{"audio": float32 [crop_samples]}` (`[crop_samples, channels]` with
    channel_mode "keep") or None (near-silent record).

    A picklable callable for `grain.MapDataset.random_map` (rng comes from
    grain: a function of the op seed and element index).
    """

    def __init__(self, cfg, *, source_index: int, source_rate: int | None, audio_key: str,
                 augment: bool):
        self.rate = int(cfg.sample_rate)
        self.crop = int(round(cfg.crop_seconds * self.rate))
        if self.crop <= 0:
            raise ValueError(f"crop_seconds * sample_rate must be >= 1, got {cfg.crop_seconds}")
        self.silence_db = cfg.silence_threshold_db
        self.attempts = max(int(cfg.crop_attempts), 1)
        self.target_db = cfg.target_loudness_db
        self.max_peak = float(cfg.max_peak)
        self.gain_db = float(cfg.random_gain_db) if augment else 0.0
        self.polarity = bool(cfg.random_polarity) and augment
        self.channel_mode = cfg.channel_mode
        if self.channel_mode not in ("mix", "first", "random", "keep"):
            raise ValueError(f"channel_mode must be 'mix', 'first', 'random' or 'keep', "
                             f"got {self.channel_mode!r}")
        self.channels = int(cfg.channels) if self.channel_mode == "keep" else 1
        if self.channels < 1:
            raise ValueError(f"data.channels must be >= 1, got {cfg.channels}")
        self.with_metadata = bool(cfg.with_metadata)
        self.source_index = source_index
        self.source_rate = source_rate
        self.audio_key = audio_key

    def __call__(self, record: dict, rng: np.random.Generator) -> dict | None:
        audio = np.asarray(record[self.audio_key])
        if audio.ndim == 1:
            audio = audio[:, None]
        if "sample_rate" in record:
            rate = int(record["sample_rate"])
        elif self.source_rate:
            rate = int(self.source_rate)
        else:
            raise ValueError("record has no 'sample_rate'; set 'sample_rate' in the data source spec")
        # Crop at the record's own rate, with a margin for the resampler.
        need = self.crop if rate == self.rate else int(math.ceil(self.crop * rate / self.rate)) + 16
        channel = int(rng.integers(audio.shape[1])) if self.channel_mode == "random" else 0
        n = audio.shape[0]
        seg = None
        for _ in range(self.attempts if n > need else 1):
            if n >= need:
                off = int(rng.integers(0, n - need + 1))
                cand = self._mono(audio[off:off + need], channel)
            else:  # short record: place it at a random offset in silence
                off = int(rng.integers(0, need - n + 1))
                cand = np.zeros((need,) + self._mono(audio[:1], channel).shape[1:], np.float32)
                cand[off:off + n] = self._mono(audio, channel)
            if self.silence_db is None or _rms_db(cand) >= self.silence_db:
                seg = cand
                break
        if seg is None:
            return None
        if rate != self.rate:
            from codec_jax.audio.io import resample
            seg = resample(seg, rate, self.rate, quality="MQ")
            pad = ((0, max(self.crop - seg.shape[0], 0)),) + ((0, 0),) * (seg.ndim - 1)
            seg = np.pad(seg, pad)[: self.crop]
        seg = self._levels(seg, rng)
        out = {"audio": seg.astype(np.float32, copy=False)}
        if self.with_metadata:
            out["source_index"] = np.int32(self.source_index)
            out["record_index"] = np.int64(record.get("_record_index", -1))
        return out

    def _mono(self, x: np.ndarray, channel: int) -> np.ndarray:
        """`[samples, channels]` -> float32 `[samples]` (channel_mode "keep": float32
        `[samples, self.channels]`, mono duplicated, extra channels dropped)."""
        if self.channel_mode == "keep":
            picked = [x[:, min(c, x.shape[1] - 1)] for c in range(self.channels)]
            return np.stack([_to_float(p) for p in picked], axis=1)
        if x.shape[1] == 1 or self.channel_mode != "mix":
            return _to_float(x[:, min(channel, x.shape[1] - 1)])
        # Column by column: a reduction over the short, strided channel axis
        # (x.mean(axis=1)) is several times slower.
        acc = _to_float(x[:, 0]).copy()
        for c in range(1, x.shape[1]):
            acc += _to_float(x[:, c])
        acc *= np.float32(1.0 / x.shape[1])
        return acc

    def _levels(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        gain_db = 0.0
        if self.target_db is not None:
            gain_db = self.target_db - _rms_db(x)
        if self.gain_db:
            gain_db += float(rng.uniform(-self.gain_db, self.gain_db))
        gain = 10.0 ** (gain_db / 20.0)
        peak = max(float(x.max()), -float(x.min())) if x.size else 0.0
        if peak * gain > self.max_peak:  # limit rather than clip: no added distortion
            gain = self.max_peak / peak
        if self.polarity and rng.random() < 0.5:
            gain = -gain
        return x * np.float32(gain)


# --------------------------------------------------------------------------- assembly

class PipelineIterator(grain.DatasetIterator):
    """The pipeline's batch iterator: a grain `DatasetIterator` (so
    `get_state`/`set_state` and grain's orbax handler work) that

      * returns plain numpy batches: with worker processes grain hands over
        shared-memory arrays, which are copied here so the shared memory is
        released at once instead of whenever the caller drops the batch;
      * closes the grain pipeline from an atexit hook: grain's own cleanup in
        `__del__` runs after module teardown at interpreter exit and prints
        tracebacks (and leaks shared memory) otherwise.
    """

    def __init__(self, inner: grain.DatasetIterator):
        super().__init__(inner)
        _OPEN_ITERATORS.add(self)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise ValueError("the data iterator was closed")
        try:
            batch = next(self._parent)
        except ValueError as e:
            if "_crop_was_kept" not in str(e):
                raise
            raise ValueError(
                "almost every crop was near-silent and skipped (grain's filter check: "
                f"{e}). A source is (nearly) all silence, or silence_threshold_db is too high."
            ) from e
        return {k: v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}

    def get_state(self) -> dict[str, Any]:
        if self._closed:
            raise ValueError("the data iterator was closed")
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        if self._closed:
            raise ValueError("the data iterator was closed")
        self._parent.set_state(state)

    def close(self) -> None:
        """Stops worker processes / prefetch threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for p in self._parents:
            p.close()
        # Drop the grain iterators now, while their modules are still alive.
        self._parents = ()

    def __del__(self, _is_finalizing=sys.is_finalizing):
        # Bound as a default: module globals may already be None at exit.
        if not self._closed and not _is_finalizing():
            self.close()


_OPEN_ITERATORS: "weakref.WeakSet[PipelineIterator]" = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for it in list(_OPEN_ITERATORS):
        try:
            it.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _crop_was_kept(x) -> bool:
    return x is not None


def _mixed_elements(cfg, specs: Sequence[Any], *, train: bool, seed: int, process_index: int,
                    process_count: int) -> grain.MapDataset:
    """Per-element MapDataset (crops, may hold None) mixing all sources by weight."""
    specs = [_as_dict(s) for s in specs]
    if not specs:
        raise ValueError("data config has no sources")
    shuffle_seed = seed if cfg.shuffle_seed is None else cfg.shuffle_seed
    datasets, weights = [], []
    for i, spec in enumerate(specs):
        weight = float(spec.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"source weights must be > 0, got {weight} for {spec}")
        ds, rate = _source_dataset(
            spec, cfg, train=train, process_index=process_index, process_count=process_count,
            seed=_derive_seed(shuffle_seed, i),
        )
        crop = CropAndAugment(cfg, source_index=i, source_rate=rate,
                              audio_key=spec.get("audio_key", "audio"), augment=train)
        # Crop/augment randomness differs per source and per process.
        ds = ds.random_map(crop, seed=_derive_seed(seed, i, process_index, 0 if train else 1))
        datasets.append(ds)
        weights.append(weight)
    if len(datasets) == 1:
        return datasets[0]
    return grain.MapDataset.mix(datasets, weights)


def _check_common(cfg) -> None:
    if cfg.sample_rate <= 0 or cfg.crop_seconds <= 0:
        raise ValueError(f"sample_rate and crop_seconds must be > 0, got {cfg.sample_rate}, {cfg.crop_seconds}")


def create_train_iterator(
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> PipelineIterator:
    """Infinite training iterator of `{"audio": float32 [local_batch, crop_samples]}`.

    Args:
      data_config: `default_data_config()`-shaped ConfigDict.
      global_batch_size: batch over all processes; must divide by process_count.
      seed: seeds crops and augmentation (and shuffling when
        `data_config.shuffle_seed` is None).
      process_index, process_count: this host's slice; each process reads a
        disjoint subset of every source's records
        (e.g. `jax.process_index()`, `jax.process_count()`).

    Returns:
      a `grain.DatasetIterator` (`local_batch = global_batch_size // process_count`)
      with `get_state()` / `set_state()`; checkpoint it with orbax through
      `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`.
      With `num_workers > 0`, call `it.close()` when done to stop the workers.
    """
    cfg = data_config
    _check_common(cfg)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of process_count {process_count}"
        )
    local_batch = global_batch_size // process_count
    ds = _mixed_elements(cfg, cfg.sources, train=True, seed=seed,
                         process_index=process_index, process_count=process_count)
    return PipelineIterator(iter(_batched(ds, cfg, local_batch, num_workers=int(cfg.num_workers))))


def create_eval_iterator(
    data_config,
    *,
    batch_size: int,
    num_batches: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> PipelineIterator:
    """Finite, deterministic iterator of `num_batches` eval batches.

    `{"audio": float32 [batch_size, crop_samples]}` from `eval_sources`
    (TFDS sources default to the "validation" split, read in stored order and
    cycled if too short). Loudness is normalised; no random gain or polarity.
    Every call with the same arguments yields the same batches. `batch_size`
    is per process.
    """
    cfg = data_config
    _check_common(cfg)
    if batch_size <= 0 or num_batches <= 0:
        raise ValueError(f"batch_size and num_batches must be > 0, got {batch_size}, {num_batches}")
    ds = _mixed_elements(cfg, cfg.eval_sources, train=False, seed=seed,
                         process_index=process_index, process_count=process_count)
    it_ds = _batched(ds, cfg, batch_size, num_workers=0)
    return PipelineIterator(iter(grain.experimental.LimitIterDataset(it_ds, count=num_batches)))


def _ensure_absl_flags_parsed() -> None:
    """grain 0.2.x's worker code reads absl flags and raises
    UnparsedFlagAccessError in programs that do not run under `absl.app`
    (google/grain#1355). Marking flags parsed keeps their defaults; programs
    that parse flags themselves have already done so."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _batched(ds: grain.MapDataset, cfg, batch_size: int, *, num_workers: int) -> grain.IterDataset:
    read = grain.ReadOptions(
        num_threads=max(int(cfg.read_threads), 1),
        prefetch_buffer_size=max(2 * batch_size, 16),
    )
    it_ds = ds.to_iter_dataset(read, allow_nones=True).filter(_crop_was_kept)
    # Dropped crops are expected (near-silent records); a source that is
    # almost all silence is a data problem, so fail loudly instead of spinning.
    it_ds = grain.experimental.WithOptionsIterDataset(
        it_ds, grain.experimental.DatasetOptions(filter_raise_threshold_ratio=0.98)
    )
    it_ds = it_ds.batch(batch_size, drop_remainder=True)
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers,
                                         per_worker_buffer_size=max(int(cfg.prefetch), 1))
        )
    elif int(cfg.prefetch) > 0:
        # Batches are assembled in a background thread while the model runs
        # (numpy and XLA release the GIL).
        it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=int(cfg.prefetch))
    return it_ds
