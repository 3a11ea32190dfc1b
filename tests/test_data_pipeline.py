"""grain pipeline (codec_jax.data.pipeline): batches, resumable state, sharding,
mixing, crops, channel handling, levels, eval set, errors.

TFDS datasets are built here from generated tones (no TensorFlow, no network).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

from codec_jax.data import pipeline, prepare

SR = 24000


def _write(path, x, sr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, x, sr, subtype="PCM_16")


def _tone(seconds, sr, freq, amp=0.3):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _rms_db(x):
    return 10 * np.log10(np.mean(np.square(x.astype(np.float64)), axis=-1) + 1e-20)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    out = str(tmp_path_factory.mktemp("tfds"))
    # 12 tones of distinct frequencies -> 9 train + 3 validation records.
    for i in range(12):
        _write(f"{root}/tones/t{i:02d}.wav", _tone(2.0, SR, 200 + 50 * i), SR)
    prepare.prepare_folder(f"{root}/tones", name="pipe_tones", data_dir=out, validation_fraction=0.25)
    # Mostly silent, entirely silent, and a stereo file with a silent right channel.
    burst = np.zeros(6 * SR, np.float32)
    burst[3 * SR: int(3.3 * SR)] = _tone(0.3, SR, 1000)
    _write(f"{root}/special/mostly_silent.wav", burst, SR)
    _write(f"{root}/special/all_silent.wav", np.zeros(3 * SR, np.float32), SR)
    prepare.prepare_folder(f"{root}/special", name="pipe_special", data_dir=out, validation_fraction=0)
    stereo = np.stack([_tone(3.0, SR, 440, amp=0.5), np.zeros(3 * SR, np.float32)], axis=1)
    _write(f"{root}/stereo/lr.wav", stereo, SR)
    prepare.prepare_folder(f"{root}/stereo", name="pipe_stereo", data_dir=out, validation_fraction=0)
    # Stored at 16 kHz: the pipeline resamples crops to 24 kHz on the fly.
    _write(f"{root}/lowrate/k.wav", _tone(3.0, 16000, 1000), 16000)
    prepare.prepare_folder(f"{root}/lowrate", name="pipe_16k", data_dir=out, sample_rate=16000,
                           validation_fraction=0)
    return out


def _cfg(data_dir=None, *names, **overrides):
    cfg = pipeline.default_data_config()
    if names:
        cfg.sources = [{"kind": "tfds", "name": n, "data_dir": data_dir, "weight": 1.0} for n in names]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _take(it, n):
    out = [next(it) for _ in range(n)]
    return out


def test_synthetic_default_batches():
    cfg = pipeline.default_data_config()
    it = pipeline.create_train_iterator(cfg, global_batch_size=8, seed=0)
    try:
        batches = _take(it, 3)
    finally:
        it.close()
    for b in batches:
        assert set(b) == {"audio"}
        x = b["audio"]
        assert x.shape == (8, SR) and x.dtype == np.float32 and type(x) is np.ndarray
        assert np.all(np.isfinite(x)) and np.max(np.abs(x)) <= cfg.max_peak + 1e-6
        rms = _rms_db(x)
        # Normalised to -20 dBFS, then +-6 dB random gain (lower only if peak-limited).
        assert np.all(rms <= -20 + 6 + 0.05) and np.all(rms >= cfg.silence_threshold_db)
    assert not np.array_equal(batches[0]["audio"], batches[1]["audio"])


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.slow
def test_state_restore_gives_identical_next_batches(data_dir, num_workers):
    cfg = _cfg(data_dir, "pipe_tones", crop_seconds=0.25, num_workers=num_workers)
    cfg.sources = [{"kind": "synthetic", "weight": 1.0}] + list(cfg.sources)
    it = pipeline.create_train_iterator(cfg, global_batch_size=4, seed=3)
    try:
        first = _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        want = _take(it, 4)
    finally:
        it.close()
    it2 = pipeline.create_train_iterator(cfg, global_batch_size=4, seed=3)
    try:
        again = _take(it2, 3)  # same seed: same stream from the start
        it2.set_state(state)
        got = _take(it2, 4)
    finally:
        it2.close()
    for a, b in zip(first + want, again + got):
        np.testing.assert_array_equal(a["audio"], b["audio"])
    cfg.num_workers = 0  # (spawning workers again would only cost time)
    other = pipeline.create_train_iterator(cfg, global_batch_size=4, seed=4)
    try:
        assert not np.any([np.allclose(r1, r2) for r1 in next(other)["audio"] for r2 in first[0]["audio"]])
    finally:
        other.close()


def test_orbax_checkpoint_roundtrip(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg = _cfg(crop_seconds=0.25)
    it = pipeline.create_train_iterator(cfg, global_batch_size=2, seed=0)
    _take(it, 2)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = _take(it, 2)
    it2 = pipeline.create_train_iterator(cfg, global_batch_size=2, seed=0)
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    got = _take(it2, 2)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a["audio"], b["audio"])
    it.close()
    it2.close()


def test_process_sharding_is_disjoint_and_complete(data_dir):
    cfg = _cfg(data_dir, "pipe_tones", crop_seconds=0.25, with_metadata=True)
    n_records = 9
    per_process = []
    for p in range(3):
        it = pipeline.create_train_iterator(cfg, global_batch_size=3, seed=0, process_index=p, process_count=3)
        # Two epochs of this process's 3 records, one per batch (local batch 1).
        idx = [int(b["record_index"][0]) for b in _take(it, 6)]
        it.close()
        assert sorted(idx[:3]) == sorted(idx[3:])  # each epoch is a permutation of the shard
        per_process.append(set(idx[:3]))
    assert sum(len(s) for s in per_process) == n_records
    assert set().union(*per_process) == set(range(n_records))
    # Synthetic sources are split by index too: processes get different signals.
    cfg = _cfg(crop_seconds=0.25)
    a = pipeline.create_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0, process_count=2)
    b = pipeline.create_train_iterator(cfg, global_batch_size=4, seed=0, process_index=1, process_count=2)
    xa, xb = next(a)["audio"], next(b)["audio"]
    assert xa.shape == xb.shape == (2, SR // 4)
    assert not np.any([np.allclose(r1, r2) for r1 in xa for r2 in xb])
    a.close()
    b.close()


def test_weighted_mixture(data_dir):
    cfg = _cfg(data_dir, "pipe_tones", crop_seconds=0.25, with_metadata=True)
    cfg.sources = [{"kind": "synthetic", "weight": 1.0},
                   {"kind": "tfds", "name": "pipe_tones", "data_dir": data_dir, "weight": 3.0}]
    it = pipeline.create_train_iterator(cfg, global_batch_size=16, seed=0)
    src = np.concatenate([b["source_index"] for b in _take(it, 25)])
    it.close()
    assert set(np.unique(src)) == {0, 1}
    assert abs(np.mean(src == 1) - 0.75) < 0.05


def test_crops_avoid_silence_and_skip_silent_records(data_dir):
    import tensorflow_datasets as tfds

    paths = [r["path"].decode() for r in tfds.data_source("pipe_special", data_dir=data_dir)["train"]]
    silent_index = paths.index("all_silent.wav")
    cfg = _cfg(data_dir, "pipe_special", crop_seconds=0.5, with_metadata=True,
               target_loudness_db=None, random_gain_db=0.0, random_polarity=False)
    it = pipeline.create_train_iterator(cfg, global_batch_size=8, seed=0)
    batches = _take(it, 4)
    it.close()
    idx = np.concatenate([b["record_index"] for b in batches])
    assert silent_index not in idx and len(idx) == 32
    rms = _rms_db(np.concatenate([b["audio"] for b in batches]))
    assert np.all(rms >= cfg.silence_threshold_db)
    # Without the silence filter, silent crops do come out (the test above can fail).
    cfg.silence_threshold_db = None
    it = pipeline.create_train_iterator(cfg, global_batch_size=8, seed=0)
    rms = _rms_db(np.concatenate([b["audio"] for b in _take(it, 4)]))
    it.close()
    assert np.any(rms < -50)


@pytest.mark.parametrize("mode, peak", [("mix", 0.25), ("first", 0.5), ("random", 0.5)])
def test_channel_modes(data_dir, mode, peak):
    # Left: 0.5 * sine, right: silence. "random" draws the silent right channel
    # half the time; those crops are near-silent and dropped.
    cfg = _cfg(data_dir, "pipe_stereo", crop_seconds=0.25, channel_mode=mode,
               target_loudness_db=None, random_gain_db=0.0, random_polarity=False)
    it = pipeline.create_train_iterator(cfg, global_batch_size=4, seed=0)
    x = np.concatenate([b["audio"] for b in _take(it, 3)])
    it.close()
    np.testing.assert_allclose(np.max(np.abs(x), axis=1), peak, rtol=0.01)


def test_loudness_gain_and_polarity(data_dir):
    base = dict(crop_seconds=0.25, random_gain_db=0.0, random_polarity=False)
    it = pipeline.create_train_iterator(_cfg(data_dir, "pipe_tones", **base), global_batch_size=16, seed=1)
    plain = next(it)["audio"]
    it.close()
    np.testing.assert_allclose(_rms_db(plain), -20.0, atol=0.05)  # sines: never peak-limited
    it = pipeline.create_train_iterator(
        _cfg(data_dir, "pipe_tones", **dict(base, random_gain_db=6.0, random_polarity=True)),
        global_batch_size=16, seed=1)
    aug = next(it)["audio"]
    it.close()
    # Same crops, each scaled by one factor g with |g| in [-6, +6] dB, either sign.
    g = np.sum(aug * plain, axis=1) / np.sum(plain * plain, axis=1)
    np.testing.assert_allclose(aug, g[:, None] * plain, atol=1e-5)
    gain_db = 20 * np.log10(np.abs(g))
    assert np.all(np.abs(gain_db) <= 6.0 + 1e-3) and np.std(gain_db) > 1.0
    assert np.any(g < 0) and np.any(g > 0)


def test_dataset_rate_is_resampled_on_the_fly(data_dir):
    cfg = _cfg(data_dir, "pipe_16k", crop_seconds=0.5, random_gain_db=0.0)
    it = pipeline.create_train_iterator(cfg, global_batch_size=2, seed=0)
    x = next(it)["audio"]
    it.close()
    assert x.shape == (2, SR // 2)
    spec = np.abs(np.fft.rfft(x[0] * np.hanning(x.shape[1])))
    assert np.fft.rfftfreq(x.shape[1], 1 / SR)[np.argmax(spec)] == pytest.approx(1000, abs=4)


def test_eval_iterator_is_finite_deterministic_and_unaugmented(data_dir):
    cfg = _cfg(data_dir, "pipe_tones", crop_seconds=0.25)
    cfg.eval_sources = [{"kind": "tfds", "name": "pipe_tones", "data_dir": data_dir, "weight": 1.0},
                        {"kind": "synthetic", "weight": 1.0}]
    cfg.with_metadata = True
    a = list(pipeline.create_eval_iterator(cfg, batch_size=4, num_batches=5))
    b = list(pipeline.create_eval_iterator(cfg, batch_size=4, num_batches=5))
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["audio"], y["audio"])
    tones = np.concatenate([x["audio"][x["source_index"] == 0] for x in a])
    np.testing.assert_allclose(_rms_db(tones), -20.0, atol=0.05)  # normalised, no random gain
    # 3 validation records, cycled in stored order.
    rec = np.concatenate([x["record_index"][x["source_index"] == 0] for x in a])
    assert set(rec) == {0, 1, 2}
    # Eval synthetic signals are not the training ones.
    cfg.sources = [{"kind": "synthetic", "weight": 1.0}]
    cfg.eval_sources = [{"kind": "synthetic", "weight": 1.0}]
    tr = pipeline.create_train_iterator(cfg, global_batch_size=4, seed=0)
    ev = next(pipeline.create_eval_iterator(cfg, batch_size=4, num_batches=1, seed=0))
    assert not np.any([np.allclose(r1, r2) for r1 in next(tr)["audio"] for r2 in ev["audio"]])
    tr.close()


def test_clear_errors(data_dir):
    cfg = _cfg(data_dir, "no_such_dataset")
    with pytest.raises(FileNotFoundError) as e:
        pipeline.create_train_iterator(cfg, global_batch_size=2, seed=0)
    msg = str(e.value)
    assert data_dir in msg and "codec-jax prepare-data" in msg and "pipe_tones" in msg
    cfg = _cfg(data_dir, "pipe_special")
    cfg.eval_sources = list(cfg.sources)  # eval defaults to the validation split
    with pytest.raises(ValueError, match="no split 'validation'"):
        pipeline.create_eval_iterator(cfg, batch_size=2, num_batches=1)
    with pytest.raises(ValueError, match="multiple of process_count"):
        pipeline.create_train_iterator(_cfg(), global_batch_size=3, seed=0, process_count=2)
    bad = _cfg()
    bad.sources = [{"kind": "webdataset"}]
    with pytest.raises(ValueError, match="unknown data source kind"):
        pipeline.create_train_iterator(bad, global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="fewer than"):
        pipeline.create_train_iterator(_cfg(data_dir, "pipe_stereo"), global_batch_size=4, seed=0,
                                       process_index=0, process_count=2)
    # A source of pure silence raises instead of spinning forever.
    silent = _cfg(data_dir, "pipe_special", crop_seconds=0.1, silence_threshold_db=-10.0)
    it = pipeline.create_train_iterator(silent, global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="near-silent"):
        next(it)
    it.close()
    with pytest.raises(ValueError, match="channel_mode"):
        pipeline.create_train_iterator(_cfg(channel_mode="left"), global_batch_size=2, seed=0)
