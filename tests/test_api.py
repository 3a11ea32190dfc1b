"""Public API contract: shapes, dtypes, trimming, compile-once, input validation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import codec_jax
from codec_jax.nn import snac as models


@pytest.fixture(scope="module")
def codec():
    return codec_jax.load_pretrained("tiny")


def test_encode_shapes_and_dtypes(codec):
    c = codec.config
    audio = np.random.default_rng(0).normal(0, 0.2, (3, 5000)).astype(np.float32)
    codes = codec.encode(audio)
    assert len(codes) == c.n_levels
    assert [x.shape for x in codes] == [(3, f) for f in c.frames_per_level(5000)]
    assert all(x.dtype == jnp.int32 for x in codes)
    assert all(int(x.min()) >= 0 and int(x.max()) < c.codebook_size for x in codes)
    out = codec.decode(codes, length=5000)
    assert out.shape == (3, 5000) and out.dtype == jnp.float32
    full = codec.decode(codes)
    assert full.shape == (3, c.padded_length(5000))
    # jax input works the same as numpy input
    np.testing.assert_array_equal(np.asarray(codec.encode(jnp.asarray(audio))[0]), np.asarray(codes[0]))


def test_decode_without_rng_is_deterministic_and_noise_differs(codec):
    audio = np.random.default_rng(1).normal(0, 0.2, (1, 3000)).astype(np.float32)
    codes = codec.encode(audio)
    a, b = codec.decode(codes), codec.decode(codes)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    noisy = codec.decode(codes, rng=jax.random.key(0))
    assert float(jnp.abs(noisy - a).max()) > 0


def test_prefix_of_levels_decodes(codec):
    audio = np.random.default_rng(2).normal(0, 0.2, (2, 3000)).astype(np.float32)
    codes = codec.encode(audio)
    coarse = codec.encode(audio, n_levels=1)
    assert len(coarse) == 1
    np.testing.assert_array_equal(np.asarray(coarse[0]), np.asarray(codes[0]))
    assert codec.decode(codes[:1], length=3000).shape == (2, 3000)


def test_functional_encode_compiles_once_per_shape():
    config = codec_jax.get_preset("tiny")
    variables = codec_jax.init_variables(config, 0)
    model = models.SNAC(config)

    @jax.jit
    @chex.assert_max_traces(n=2)
    def encode(variables, audio):
        return model.apply(variables, audio, method=models.SNAC.encode)

    x = jnp.zeros((2, 4000))
    for _ in range(3):
        encode(variables, x)
        encode(variables, x + 1)
    encode(variables, jnp.zeros((2, 6000)))  # new shape: one more trace, allowed
    with pytest.raises(AssertionError):
        encode(variables, jnp.zeros((2, 7000)))  # a third shape exceeds the budget


def test_public_jitted_functions_cache(codec, monkeypatch):
    """`Codec.encode` / `codec_jax.encode` trace the model once per input shape: the static
    arguments they pass (config, dtype, quantizer) must hash equal across calls."""
    traces = []
    original = models.SNAC.encode

    def counting_encode(self, *args, **kwargs):
        traces.append(args[0].shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(models.SNAC, "encode", counting_encode)
    audio = np.zeros((1, 2 * codec.config.pad_multiple + 17), np.float32)  # a shape no other test uses
    for seed in range(3):
        codec.encode(audio + seed)
    assert len(traces) == 1
    for seed in range(3):  # the functional form: its own cache entry (other kwargs), once
        codec_jax.encode(codec.variables, jnp.asarray(audio) + seed, config=codec.config)
    assert len(traces) == 2
    codec.encode(np.zeros((1, audio.shape[1] + 1), np.float32))
    assert len(traces) == 3


@pytest.mark.parametrize("bad, message", [
    (np.zeros(100, np.float32), "batch"),
    (np.zeros((1, 1, 100), np.float32), r"\[batch, samples\]"),
    (np.zeros((1, 0), np.float32), "no samples"),
    (np.zeros((1, 100), np.int16), "floating point"),
    (np.full((1, 100), np.nan, np.float32), "NaN"),
    (np.array([[0.0, np.inf]], np.float32), "infinite"),
])
def test_bad_audio_is_rejected(codec, bad, message):
    with pytest.raises(ValueError, match=message):
        codec.encode(bad)


def test_bad_codes_are_rejected(codec):
    codes = codec.encode(np.zeros((1, 3000), np.float32))
    with pytest.raises(ValueError, match="code values"):
        codec.decode([codes[0] + codec.config.codebook_size] + list(codes[1:]))
    with pytest.raises(ValueError, match="frames"):
        codec.decode([codes[0], codes[1][:, :-1], codes[2]])
    with pytest.raises(ValueError, match="levels"):
        codec.decode(list(codes) + [codes[-1]])
    with pytest.raises(ValueError, match="no frames"):
        codec.decode([c[:, :0] for c in codes])
    with pytest.raises(ValueError, match=r"codes\[1\]: code values"):  # names the bad level
        codec.decode([codes[0], codes[1] - codes[1] - 1, codes[2]])


def test_bfloat16_compute_stays_close(codec):
    audio = np.random.default_rng(3).normal(0, 0.2, (2, 4000)).astype(np.float32)
    codes = codec.encode(audio)
    bf16 = codec_jax.Codec(codec.config, codec.variables, dtype="bfloat16")
    y32 = np.asarray(codec.decode(codes))
    y16 = np.asarray(bf16.decode(codes))
    assert y16.dtype == np.float32
    rel = np.linalg.norm(y16 - y32) / np.linalg.norm(y32)
    assert rel < 5e-2, rel
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(bf16.params))


def test_bitrates_of_published_presets():
    assert round(codec_jax.get_preset("snac_24khz").bitrate() / 1000, 2) == 0.98
    assert round(codec_jax.get_preset("snac_32khz").bitrate() / 1000, 1) == 1.9
    assert round(codec_jax.get_preset("snac_44khz").bitrate() / 1000, 1) == 2.6


def test_ema_codec_encodes_decodes_and_round_trips(tmp_path):
    """A codec with EMA codebooks (the `codebook` collection) works through the public API
    and survives save/load with its quantizer config."""
    from codec_jax.nn.quantizer import QuantizerConfig

    config = codec_jax.get_preset("tiny")
    quantizer = QuantizerConfig(kind="ema", codebook_sizes=(16, 32, 64))
    variables = codec_jax.init_variables(config, 0, quantizer=quantizer)
    assert "codebook" in variables
    codec = codec_jax.Codec(config, variables, quantizer=quantizer)
    audio = np.random.default_rng(4).normal(0, 0.2, (2, 3000)).astype(np.float32)
    codes = codec.encode(audio)
    assert [int(c.max()) < s for c, s in zip(codes, (16, 32, 64))] == [True] * 3
    with pytest.raises(ValueError, match=r"codes\[0\]"):
        codec.decode([codes[0] + 16] + list(codes[1:]))
    out = np.asarray(codec.decode(codes, length=3000))
    codec.save(tmp_path / "ema")
    again = codec_jax.load_pretrained(str(tmp_path / "ema"))
    assert again.quantizer == quantizer
    np.testing.assert_array_equal(np.asarray(again.encode(audio)[1]), np.asarray(codes[1]))
    np.testing.assert_array_equal(np.asarray(again.decode(codes, length=3000)), out)
