"""Training metric writers and pictures (`codec_jax/training/metrics.py`)."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest

from codec_jax.training import metrics as tm


def read_events(paths) -> list:
    """TensorBoard `Event` protos from TFRecord-framed files, in file order."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in paths:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return events


def test_spectrogram_image_puts_a_tone_in_its_frequency_row():
    rate, n_fft = 16000, 512
    t = np.arange(rate // 2) / rate
    image = tm.spectrogram_image(0.5 * np.sin(2 * np.pi * 1000 * t), n_fft=n_fft)
    assert image.dtype == np.uint8 and image.shape[0] == n_fft // 2 + 1 and image.shape[2] == 3
    brightness = image.astype(np.int64).sum(axis=(1, 2))  # per row, low frequencies at the bottom
    tone_bin = round(1000 * n_fft / rate)
    assert int(np.argmax(brightness)) == n_fft // 2 - tone_bin


def test_spectrogram_of_non_finite_audio_is_a_clear_error():
    audio = np.zeros(2048, np.float32)
    audio[[3, 700]] = np.nan
    with pytest.raises(ValueError, match="2 of 2048 samples are non-finite"):
        tm.spectrogram_image(audio)
    assert tm.finite_or_none(np.ones(4)) is None


def test_tensorboard_writer_stores_png_images_and_audio(tmp_path):
    from PIL import Image

    image = tm.spectrogram_image(np.sin(np.arange(4096) * 0.3))
    writer = tm.create_writer(tmp_path)
    writer.write_scalars(3, {"train/loss": 1.5, "train/bad": float("nan")})
    writer.write_images(3, {"eval/spectrogram": image})
    writer.write_audios(3, {"eval/clip": np.zeros((1, 1600, 1), np.float32)}, sample_rate=16000)
    writer.close()

    events = read_events(sorted((tmp_path / "tensorboard").glob("*tfevents*")))
    values = {v.tag: v for e in events for v in e.summary.value}
    png = values["eval/spectrogram"].image.encoded_image_string
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), image)
    assert values["eval/clip"].audio.sample_rate == 16000
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 3, "train/loss": 1.5, "train/bad": "nan"}]


def test_writers_of_other_processes_write_nothing(tmp_path):
    writer = tm.create_writer(tmp_path / "run", enabled=False)
    writer.write_scalars(1, {"x": 1.0})
    writer.close()
    assert not (tmp_path / "run").exists()
