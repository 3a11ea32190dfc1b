"""Multi-channel (stereo) codecs: channels coded jointly, from the config to training."""

from __future__ import annotations

import json

import numpy as np
import pytest

import codec_jax
from codec_jax.config import PRESETS, SNAC_CONFIG_KEYS, SNACConfig
from codec_jax.data import synthetic
from codec_jax.data.pipeline import CropAndAugment, default_data_config
from codec_jax.errors import UsageError


def test_mono_configs_keep_snac_keys_and_stereo_round_trips():
    for name, cfg in PRESETS.items():
        keys = set(cfg.to_dict())
        if cfg.audio_channels == 1:
            assert keys == set(SNAC_CONFIG_KEYS), name  # config.json stays SNAC's own
        assert SNACConfig.from_dict(cfg.to_dict()) == cfg
    stereo = PRESETS["snac_48khz_stereo"]
    assert (stereo.sampling_rate, stereo.hop_length, stereo.audio_channels) == (48000, 512, 2)
    with pytest.raises(ValueError, match="audio_channels must be >= 1"):
        SNACConfig(audio_channels=0)


@pytest.fixture(scope="module")
def stereo_codec():
    return codec_jax.load_pretrained("tiny_stereo")


def _clip(rng, batch, n):
    return (0.2 * rng.standard_normal((batch, n, 2))).astype(np.float32)


@pytest.mark.slow
def test_stereo_codes_depend_on_both_channels_jointly(stereo_codec):
    rng = np.random.default_rng(0)
    x = _clip(rng, 2, 8000)
    codes = [np.asarray(c) for c in stereo_codec.encode(x)]
    # One code stream per level for both channels together.
    assert [c.shape for c in codes] == [(2, f) for f in stereo_codec.config.num_frames(8000)]
    out = np.asarray(stereo_codec.decode(codes, length=8000))
    assert out.shape == (2, 8000, 2) and np.isfinite(out).all()
    new_right = x.copy()
    new_right[:, :, 1] = 0.2 * rng.standard_normal(x.shape[:2])
    swapped = np.ascontiguousarray(x[:, :, ::-1])
    for changed in (new_right, swapped):  # the left channel alone does not fix the codes
        new = [np.asarray(c) for c in stereo_codec.encode(changed)]
        assert sum(int((a != b).sum()) for a, b in zip(new, codes)) > 0


@pytest.mark.slow
def test_stereo_rows_code_the_same_alone_and_padded_in_a_batch(stereo_codec):
    rng = np.random.default_rng(1)
    x = _clip(rng, 2, 6000)
    batched = [np.asarray(c) for c in stereo_codec.encode(x, lengths=np.array([6000, 2500]))]
    alone = [np.asarray(c) for c in stereo_codec.encode(x[1:, :2500])]
    for b, a, f in zip(batched, alone, stereo_codec.config.num_frames(2500)):
        np.testing.assert_array_equal(b[1, :f], a[0, :f])


@pytest.mark.slow
def test_stereo_layout_errors(stereo_codec):
    x = np.zeros((4000, 2), np.float32)
    with pytest.raises(UsageError, match=r"one \[samples, 2\] clip.*audio\[None\]"):
        stereo_codec.encode(x)
    with pytest.raises(UsageError, match=r"\[batch, samples, 2\]"):
        stereo_codec.encode(np.zeros((1, 4000), np.float32))
    with pytest.raises(UsageError, match=r"\[batch, samples, 2\]"):
        stereo_codec.encode(np.zeros((1, 4000, 3), np.float32))


@pytest.mark.slow
def test_stereo_codec_saves_and_loads_with_its_channels(stereo_codec, tmp_path):
    stereo_codec.save(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["audio_channels"] == 2
    loaded = codec_jax.load_pretrained(str(tmp_path / "c"))
    assert loaded.config == stereo_codec.config
    x = _clip(np.random.default_rng(2), 1, 4000)
    for a, b in zip(loaded.encode(x), stereo_codec.encode(x)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_synthetic_stereo_channels_are_distinct_panned_mixes():
    src = synthetic.SyntheticAudioSource(sample_rate=16000, seconds=0.5, seed=3, channels=2)
    mono = synthetic.SyntheticAudioSource(sample_rate=16000, seconds=0.5, seed=3)
    checked = 0
    for i in range(12):
        a = src[i]["audio"]
        s = mono[i]["audio"][:, 0]
        if s.std() < 0.01:
            continue  # the (near-)"silence" kind
        assert a.shape == (8000, 2) and np.abs(a).max() <= 0.99 + 1e-6
        assert not np.allclose(a[:, 0], a[:, 1])
        # Each channel is a mix containing signal i (the mono source's record i).
        assert max(abs(np.corrcoef(a[:, c], s)[0, 1]) for c in range(2)) > 0.1
        checked += 1
    assert checked >= 5


def test_crop_keep_mode_gives_channels_and_duplicates_mono():
    cfg = default_data_config()
    cfg.sample_rate, cfg.crop_seconds, cfg.channel_mode, cfg.channels = 16000, 0.1, "keep", 2
    crop = CropAndAugment(cfg, source_index=0, source_rate=16000, audio_key="audio", augment=False)
    rng = np.random.default_rng(0)
    stereo = {"audio": (rng.standard_normal((4000, 3)) * 3000).astype(np.int16)}
    out = crop(stereo, np.random.default_rng(1))["audio"]
    assert out.shape == (1600, 2) and not np.allclose(out[:, 0], out[:, 1])
    mono = {"audio": (rng.standard_normal(4000) * 3000).astype(np.int16)}
    out = crop(mono, np.random.default_rng(1))["audio"]
    assert out.shape == (1600, 2)
    np.testing.assert_array_equal(out[:, 0], out[:, 1])


@pytest.mark.long
def test_tiny_stereo_config_trains_and_exports_a_stereo_codec(tmp_path):
    from codec_jax.configs import tiny
    from codec_jax.training.loop import train_and_evaluate

    config = tiny.get_config("stereo")
    assert config.model.preset == "tiny_stereo" and config.data.channel_mode == "keep"
    config.train.num_steps = 3
    config.logging.every_steps = 1
    config.logging.eval_every_steps = 3
    config.logging.eval_batches = 1
    config.checkpoint.every_steps = 3
    metrics = train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(metrics["loss/mel"]) and metrics.get("skipped_total", 0) == 0, metrics
    codec = codec_jax.load_pretrained(str(tmp_path / "export"))
    assert codec.config.audio_channels == 2
    x = np.zeros((1, 4000, 2), np.float32)
    assert np.asarray(codec.decode(codec.encode(x), length=4000)).shape == (1, 4000, 2)
