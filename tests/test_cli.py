"""The command-line tools, end to end on generated audio."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from codec_jax import cli, get_preset


def _run(*args):
    return cli.main(list(args))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from snac import SNAC

    config = get_preset("tiny")
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("snac")
    (d / "config.json").write_text(json.dumps(config.to_dict()))
    torch.save(SNAC(**config.to_dict()).state_dict(), d / "pytorch_model.bin")
    return d


def test_encode_decode_round_trip_in_chunks(tmp_path, model_dir):
    sr_in = 22050  # differs from the model's 16 kHz: resampled on read
    t = np.arange(int(1.3 * sr_in)) / sr_in
    stereo = np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], 1) * 0.3
    sf.write(tmp_path / "in.wav", stereo, sr_in)
    assert _run("encode", str(model_dir), str(tmp_path / "in.wav"), "-o", str(tmp_path / "codes"),
                "--chunk-seconds", "0.5") == 0
    with np.load(tmp_path / "codes" / "in.npz") as data:
        length = int(data["length"])
        assert length == int(np.ceil(1.3 * 16000)) or abs(length - 1.3 * 16000) <= 1
        assert data["codes_0"].dtype == np.int32
    assert _run("decode", str(model_dir), str(tmp_path / "codes" / "in.npz"),
                "-o", str(tmp_path / "out.wav"), "--chunk-seconds", "0.5") == 0
    out, sr = sf.read(tmp_path / "out.wav")
    assert sr == 16000 and out.shape == (length,)
    # Refuses to overwrite without --overwrite, and the existing file is untouched.
    before = (tmp_path / "out.wav").read_bytes()
    with pytest.raises(SystemExit, match="exists"):
        _run("decode", str(model_dir), str(tmp_path / "codes" / "in.npz"), "-o", str(tmp_path / "out.wav"))
    assert (tmp_path / "out.wav").read_bytes() == before


def test_chunked_encode_equals_whole_encode_on_chunk_boundaries(model_dir):
    """Chunks are whole multiples of the padding unit, so each chunk's codes are exactly the
    codes of encoding that chunk alone (no frame is split between chunks)."""
    import codec_jax
    from codec_jax.cli.codec import encode_array

    codec = codec_jax.load_pretrained(str(model_dir))
    audio = np.random.default_rng(0).normal(0, 0.1, 3 * codec.config.pad_multiple).astype(np.float32)
    chunk_seconds = codec.config.pad_multiple / codec.config.sampling_rate
    chunked = encode_array(codec, audio, chunk_seconds, progress=False)
    for i, level in enumerate(chunked):
        first = np.asarray(codec.encode(audio[None, : codec.config.pad_multiple])[i][0])
        np.testing.assert_array_equal(level[: len(first)], first)
        assert len(level) == codec.config.frames_per_level(len(audio))[i]


def test_bad_inputs_fail_clearly(tmp_path, model_dir):
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(SystemExit, match="cannot read"):
        _run("encode", str(model_dir), str(tmp_path / "bad.wav"), "-o", str(tmp_path / "o"))
    assert not (tmp_path / "o" / "bad.npz").exists()
    assert _run("no-such-command") == 2


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "codec_jax", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "encode" in out.stdout and "train" in out.stdout
