"""Folder -> TFDS array_record dataset (codec_jax.data.folder_builder / prepare).

Every test builds from small files it writes itself; nothing needs TensorFlow
or the network.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import soundfile as sf
import soxr
import tensorflow_datasets as tfds

from codec_jax.audio import io as audio_io
from codec_jax.cli import prepare as prepare_cli
from codec_jax.data import folder_builder, prepare

SR = 24000


def _tone(seconds: float, sr: int, freq: float = 440.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t)[:, None] + 0.01 * rng.standard_normal((t.size, channels))
    return x.astype(np.float32)


def _write_good_files(root) -> dict[str, dict]:
    """Good files of several formats/rates/layouts; returns {relpath: expected}."""
    os.makedirs(os.path.join(root, "sub", "deeper"), exist_ok=True)
    good = {}

    def put(rel, x, sr, **kw):
        sf.write(os.path.join(root, rel), x, sr, **kw)
        good[rel] = {"sr": sr, "channels": x.shape[1] if x.ndim == 2 else 1}

    put("a_mono.wav", _tone(1.5, SR, 300, seed=1), SR, subtype="PCM_16")
    put("b_stereo.wav", _tone(2.0, SR, 500, channels=2, seed=2), SR, subtype="PCM_16")
    put("sub/c_16k.flac", _tone(1.2, 16000, 700, seed=3), 16000)
    put("sub/deeper/d_48k.ogg", _tone(1.0, 48000, 900, seed=4), 48000)
    put("E_UPPER.WAV", _tone(0.8, SR, 200, seed=5), SR, subtype="PCM_16")
    # 25 s > 5 s max chunk: 5 chunks of 5 s.
    put("long.wav", _tone(25.0, SR, 250, seed=6), SR, subtype="PCM_16")
    return good


def _write_bad_files(root) -> dict[str, str]:
    """Bad files; returns {relpath: expected reason prefix}."""
    with open(os.path.join(root, "garbage.wav"), "wb") as f:
        f.write(b"RIFF\x00\x00\x00\x00WAVEthis is not audio at all")
    open(os.path.join(root, "empty.flac"), "wb").close()
    sf.write(os.path.join(root, "zero_frames.wav"), np.zeros((0, 1), np.float32), SR)
    x = _tone(1.0, SR)
    x[100, 0] = np.nan
    sf.write(os.path.join(root, "nan.wav"), x, SR, subtype="FLOAT")
    sf.write(os.path.join(root, "tiny.wav"), _tone(0.02, SR), SR, subtype="PCM_16")
    with open(os.path.join(root, "sub", "fake.mp3"), "wb") as f:
        f.write(os.urandom(3000))
    return {
        "garbage.wav": "unreadable",
        "empty.flac": "empty file",  # named as such by the one audio reader (audio/io.py)
        "zero_frames.wav": "empty",
        "nan.wav": "corrupt",
        "tiny.wav": "too short",
        "sub/fake.mp3": "unreadable",
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build (through the CLI entry point) shared by the read-back tests."""
    root = tmp_path_factory.mktemp("audio")
    good = _write_good_files(root)
    bad = _write_bad_files(root)
    with open(os.path.join(root, "notes.txt"), "w") as f:  # not audio: ignored, not "bad"
        f.write("hello")
    data_dir = tmp_path_factory.mktemp("tfds")
    report_path = os.path.join(data_dir, "report.json")
    rc = prepare_cli.main([
        str(root), "--name", "unit_folder", "--data-dir", str(data_dir), "--sample-rate", str(SR),
        "--validation-fraction", "0.25", "--workers", "0", "--report", report_path, "--quiet",
    ])
    with open(report_path) as f:
        report = json.load(f)
    return {"root": str(root), "data_dir": str(data_dir), "good": good, "bad": bad, "rc": rc, "report": report}


def _all_records(data_dir: str, name: str) -> dict[str, list[dict]]:
    sources = tfds.data_source(name, data_dir=data_dir)
    out = {}
    for split, src in sources.items():
        out[split] = [src[i] for i in range(len(src))]
    return out


def _by_path(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["path"].decode(), []).append(r)
    for v in out.values():
        v.sort(key=lambda r: int(r["start_sample"]))
    return out


def test_build_succeeds_and_reports_bad_files(built):
    assert built["rc"] == 0
    report = built["report"]
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == set(built["bad"])
    for path, prefix in built["bad"].items():
        assert skipped[path].startswith(prefix), (path, skipped[path])
    assert report["files_found"] == len(built["good"]) + len(built["bad"])
    assert report["files_used"] == len(built["good"])
    assert report["files_skipped"] == len(built["bad"])
    # The report also travels with the dataset.
    info = tfds.builder_from_directory(os.path.join(built["data_dir"], "unit_folder", folder_builder.VERSION)).info
    assert info.metadata["report"]["files_skipped"] == len(built["bad"])
    assert info.metadata["sample_rate"] == SR


def test_read_back_identical_samples(built):
    records = _all_records(built["data_dir"], "unit_folder")
    assert set(records) == {"train", "validation"}
    by_path = _by_path(records["train"] + records["validation"])
    assert set(by_path) == set(built["good"])  # every good file, no bad one
    for rel, expect in built["good"].items():
        chunks = by_path[rel]
        audio = np.concatenate([c["audio"] for c in chunks], axis=0)
        assert audio.dtype == np.int16 and audio.shape[1] == expect["channels"]
        path = os.path.join(built["root"], rel)
        if expect["sr"] == SR and sf.info(path).subtype == "PCM_16":
            want = sf.read(path, dtype="int16", always_2d=True)[0]  # stored verbatim
        else:
            x = sf.read(path, dtype="float32", always_2d=True)[0]
            want = audio_io.float_to_pcm16(soxr.resample(x, expect["sr"], SR, quality="HQ"))
        np.testing.assert_array_equal(audio, want)
        starts = [int(c["start_sample"]) for c in chunks]
        assert starts == list(np.cumsum([0] + [c["audio"].shape[0] for c in chunks[:-1]]))
        for c in chunks:
            assert int(c["sample_rate"]) == SR
            assert int(c["original_sample_rate"]) == expect["sr"]
            assert int(c["channels"]) == expect["channels"]
            assert float(c["duration"]) == pytest.approx(c["audio"].shape[0] / SR, rel=1e-6)
            assert float(c["file_duration"]) == pytest.approx(audio.shape[0] / SR, rel=1e-6)
            assert c["audio"].shape[0] <= 5 * SR
    assert len(by_path["long.wav"]) == 5


def test_split_is_deterministic_and_disjoint(built):
    records = _all_records(built["data_dir"], "unit_folder")
    train = set(_by_path(records["train"]))
    val = set(_by_path(records["validation"]))
    assert train and val and not train & val
    # The split is a function of the set of paths alone (not of listing order) ...
    all_files = audio_io.find_audio_files(built["root"])
    t1, v1 = folder_builder.split_files(all_files, 0.25)
    assert (t1, v1) == folder_builder.split_files(list(reversed(all_files)), 0.25)
    # ... and the build used it: validation = the good files drawn for it, or,
    # if every drawn file was bad, the draw among the good files only.
    _, v_good = folder_builder.split_files(sorted(built["good"]), 0.25)
    assert val in (set(v1) - set(built["bad"]), set(v_good))


def test_no_tensorflow_needed(built):
    # Building and reading above ran in this process.
    assert "tensorflow" not in sys.modules


def test_existing_dataset_is_kept_without_overwrite(built, tmp_path, capsys):
    target = os.path.join(built["data_dir"], "unit_folder", folder_builder.VERSION)
    before = sorted(os.listdir(target))
    rc = prepare_cli.main([built["root"], "--name", "unit_folder", "--data-dir", built["data_dir"],
                       "--workers", "0", "--quiet"])
    assert rc == 1
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(target)) == before


def test_failed_build_leaves_nothing_and_failed_overwrite_keeps_old(tmp_path, capsys):
    src = tmp_path / "only_bad"
    src.mkdir()
    (src / "x.wav").write_bytes(b"not audio")
    (src / "y.flac").write_bytes(b"")
    data_dir = tmp_path / "tfds"
    rc = prepare_cli.main([str(src), "--name", "all_bad", "--data-dir", str(data_dir), "--workers", "0", "--quiet"])
    assert rc == 1
    assert "nothing was written" in capsys.readouterr().err
    assert not (data_dir / "all_bad").exists()

    # A good dataset survives a failed --overwrite rebuild.
    good = tmp_path / "good"
    good.mkdir()
    sf.write(good / "a.wav", _tone(1.0, SR), SR, subtype="PCM_16")
    assert prepare_cli.main([str(good), "--name", "keep_me", "--data-dir", str(data_dir),
                         "--validation-fraction", "0", "--workers", "0", "--quiet"]) == 0
    rc = prepare_cli.main([str(src), "--name", "keep_me", "--data-dir", str(data_dir), "--overwrite",
                       "--workers", "0", "--quiet"])
    assert rc == 1
    src_ds = tfds.data_source("keep_me", data_dir=str(data_dir))
    assert list(src_ds) == ["train"] and len(src_ds["train"]) == 1
    assert sorted(os.listdir(data_dir / "keep_me")) == [folder_builder.VERSION]


def test_bad_file_drawn_into_validation_does_not_kill_the_build(tmp_path):
    """The only validation file is bad: the split is redrawn among good files."""
    src = tmp_path / "audio"
    src.mkdir()
    names = [f"f{i}.wav" for i in range(4)]
    _, val = folder_builder.split_files(names, 0.25)
    assert len(val) == 1
    for n in names:
        if n in val:
            (src / n).write_bytes(b"corrupt")
        else:
            sf.write(src / n, _tone(1.0, SR, seed=len(n)), SR, subtype="PCM_16")
    report = prepare.prepare_folder(str(src), name="redraw", data_dir=str(tmp_path / "tfds"),
                                    validation_fraction=0.25)
    assert [s["path"] for s in report["skipped"]] == val
    assert report["examples"]["train"] == 2 and report["examples"]["validation"] == 1


def test_parallel_workers_give_the_same_dataset(built, tmp_path):
    rc = prepare_cli.main([built["root"], "--name", "unit_folder", "--data-dir", str(tmp_path),
                       "--validation-fraction", "0.25", "--workers", "2", "--quiet"])
    assert rc == 0
    a = _all_records(built["data_dir"], "unit_folder")
    b = _all_records(str(tmp_path), "unit_folder")
    for split in ("train", "validation"):
        pa, pb = _by_path(a[split]), _by_path(b[split])
        assert set(pa) == set(pb)
        for k in pa:
            for ra, rb in zip(pa[k], pb[k]):
                np.testing.assert_array_equal(ra["audio"], rb["audio"])


def _exit_on_boom(task):
    """Worker function for the crash-isolation test: 'boom' kills its process."""
    if task[1] == "boom":
        os._exit(3)
    return task[1], [], None


def test_worker_crash_is_reported_not_fatal():
    pool = folder_builder._OrderedPool(2)
    try:
        tasks = [(None, n) for n in ["a", "b", "boom", "c", "d"]]
        out = list(pool.map(_exit_on_boom, tasks))
    finally:
        pool.close()
    assert [o[0] for o in out] == ["a", "b", "boom", "c", "d"]
    assert out[2][1] is None and "crashed" in out[2][2]
    assert all(o[2] is None for i, o in enumerate(out) if i != 2)


@pytest.mark.parametrize("name, msg", [("LibriSpeech", "not valid"), ("librispeech", "catalog"),
                                       ("1abc", "not valid")])
def test_bad_dataset_names_are_rejected(tmp_path, capsys, name, msg):
    rc = prepare_cli.main([str(tmp_path), "--name", name, "--data-dir", str(tmp_path / "d"), "--quiet"])
    assert rc == 2
    assert msg in capsys.readouterr().err


def test_missing_source_folder(tmp_path, capsys):
    rc = prepare_cli.main([str(tmp_path / "nope"), "--name", "x_missing", "--data-dir", str(tmp_path), "--quiet"])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_chunk_bounds_cover_exactly():
    for n, m in [(10, 3), (25 * SR, 10 * SR), (7, 7), (5, None), (100, 1)]:
        b = audio_io.chunk_bounds(n, m)
        assert b[0][0] == 0 and b[-1][1] == n
        assert all(e1 == s2 for (_, e1), (s2, _) in zip(b[:-1], b[1:]))
        if m:
            assert all(e - s <= m for s, e in b)
            assert max(e - s for s, e in b) - min(e - s for s, e in b) <= 1


def test_cli_library_and_builder_share_one_set_of_build_defaults():
    # The defaults are written once (prepare.BuildDefaults); a default typed into one of the
    # three layers would make `prepare-data` and `prepare_folder` build different datasets.
    import dataclasses
    import inspect

    expected = dataclasses.asdict(prepare.DEFAULTS)
    flags = {"sample_rate": "sample_rate", "validation_fraction": "validation_fraction",
             "max_chunk_seconds": "max_chunk_seconds", "min_seconds": "min_seconds",
             "resample_quality": "quality", "compression": "compression"}
    args = prepare_cli._parser().parse_args(["src", "--name", "x"])
    assert {k: getattr(args, flag) for k, flag in flags.items()} == expected
    for fn in (prepare.prepare_folder, folder_builder.AudioFolderBuilder.__init__):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in expected} == expected, fn.__qualname__
    assert f"default {expected['sample_rate']}" in prepare_cli._parser().format_help()
