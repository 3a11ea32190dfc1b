"""The corpus jobs (codec_jax.corpus): inputs, bucket plan, encode/decode, shards, resume.

One calibrated tiny model (varied codes) and one small corpus of good and bad files are
shared by the module; every job runs in-process so the compiled programs are reused.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

import codec_jax
from codec_jax import corpus
from codec_jax.audio import codes_file as cf
from codec_jax.audio import io as audio_io
from codec_jax.config import get_preset
from codec_jax.errors import UsageError

from snac_reference import build_reference, make_signals, reference_margins, save_hub_directory

SR = 16000  # the tiny preset's rate
# Small enough to be quick, long enough that the 2.6 s file is windowed.
OPTS = dict(window_seconds=2.25, buckets=3, batch_size=2, workers=0, progress=False)


def _options(out, **kw):
    kw = {**OPTS, **kw}
    return corpus.EncodeOptions(output_dir=str(out), **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The reference SNAC with perturbed weights and codebooks from its latents (varied codes)."""
    config = get_preset("tiny").to_dict()
    model = build_reference(config, seed=0)
    return model, save_hub_directory(model, config, str(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def codec(reference):
    return codec_jax.load_pretrained(reference[1])


# Squared-distance margin below which either of two codes is a correct choice: the batched
# program may sum in another order than the exact-length one (see tests/test_invariance.py).
NEAR_TIE = 1e-5


def assert_same_codes(config, got, want, margins, what=""):
    """got/want: per level `[frames]`. Every difference must be a near-tie of the reference
    (margin < NEAR_TIE) or lie under a coarser level's difference (another residual)."""
    latent = np.asarray(want[-1]).shape[-1] * config.vq_strides[len(want) - 1]
    upstream = np.zeros(latent, bool)
    unexplained = []
    for level, (g, w, m) in enumerate(zip(got, want, margins)):
        g, w, m = np.asarray(g), np.asarray(w), np.asarray(m).reshape(-1)
        assert g.shape == w.shape, (what, level, g.shape, w.shape)
        s = config.vq_strides[level]
        differ = g != w
        inherited = upstream.reshape(-1, s).any(axis=1)
        unexplained += [(level, int(f), float(m[f]))
                        for f in np.nonzero(differ & ~inherited & ~(m < NEAR_TIE))[0]]
        upstream |= np.repeat(differ, s)
    assert not unexplained, f"{what}: codes differ where the reference has no near-tie: {unexplained}"


GOOD = {  # relpath: (seconds, sample rate, channels)
    "speech/a.wav": (0.4, 16000, 1),
    "speech/b.flac": (1.1, 22050, 2),
    "music/a.wav": (2.6, 48000, 1),      # same stem as speech/a.wav; longer than a window
    "music/deep/c.ogg": (0.07, 16000, 1),  # shorter than one padding unit
}


def _write_corpus(root):
    for i, (rel, (sec, sr, ch)) in enumerate(GOOD.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        kind = ("speech", "music")[i % 2]
        x = make_signals(kind, ch, int(sec * sr), sr, seed=i).T
        sf.write(path, 0.5 * x, sr)
    bad = root / "bad"
    bad.mkdir()
    (bad / "garbage.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot audio at all")
    (bad / "empty.wav").write_bytes(b"")
    (bad / "text.flac").write_text("this is not a flac file\n")
    (bad / "dir.wav").mkdir()  # a folder with an audio name is walked, not read
    nan = np.full(800, np.nan, np.float32)
    sf.write(bad / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(bad / "zero_frames.wav", np.zeros((0, 1), np.float32), SR)
    full = (bad / "cut.wav")
    sf.write(full, make_signals("noise", 1, SR, SR, seed=9)[0], SR)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    return {"garbage.wav", "empty.wav", "text.flac", "nan.wav", "zero_frames.wav", "cut.wav"}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    bad = _write_corpus(root)
    return root, bad


def _whole_file(codec, model, path, mix=True):
    """The reference result: the file read alone, each channel coded alone at its exact
    length. -> (codes per level int `[channels, frames]`, margins per channel and level)."""
    audio = audio_io.read_audio(str(path), target_sample_rate=SR, dtype="float32", mix=mix).pcm.T
    per_channel = [codec.encode(ch[None]) for ch in audio]
    codes = [np.stack([np.asarray(c[lv][0]) for c in per_channel])
             for lv in range(codec.config.n_levels)]
    margins = [[m[0] for m in reference_margins(model, ch[None])] for ch in audio]
    return codes, margins


@pytest.fixture(scope="module")
def encoded(codec, corpus_dir, tmp_path_factory):
    root, _ = corpus_dir
    out = tmp_path_factory.mktemp("codes")
    files = corpus.collect_inputs([str(root)], audio_io.SOUNDFILE_EXTENSIONS)
    report = corpus.encode_corpus(codec, "tiny-calibrated", files, _options(out))
    return out, files, report


# --------------------------------------------------------------------------- fast, no JAX
def test_collect_inputs_mirrors_relative_paths(tmp_path, monkeypatch):
    for rel in ("a/x.wav", "b/x.wav", "b/x.flac", "b/.hidden.wav", "b/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    files = corpus.collect_inputs([str(tmp_path)], audio_io.SOUNDFILE_EXTENSIONS)
    assert [f.relpath for f in files] == ["a/x.wav", "b/x.flac", "b/x.wav"]
    assert len({corpus.codes_path("o", f.relpath) for f in files}) == 3  # no stem collision
    # A list file names paths relative to itself; the same file twice is kept once.
    (tmp_path / "list.txt").write_text("a/x.wav\n# comment\n\nb/x.wav\na/x.wav\n")
    monkeypatch.chdir(tmp_path)
    files = corpus.collect_inputs(["@list.txt", "a/x.wav"], (".wav",))
    assert [f.relpath for f in files] == ["a/x.wav", "b/x.wav"]
    with pytest.raises(UsageError, match="two inputs map"):
        corpus.collect_inputs([str(tmp_path / "a"), str(tmp_path / "b")], (".wav",))
    with pytest.raises(UsageError, match="no such file"):
        corpus.collect_inputs(["missing.wav"], (".wav",))
    with pytest.raises(UsageError, match="cannot read file list"):
        corpus.collect_inputs(["@missing.txt"], (".wav",))


def test_process_shares_are_disjoint_and_cover_everything():
    items = [f"f{i}" for i in range(11)]
    shares = [corpus.process_share(items, i, 3) for i in range(3)]
    assert sorted(sum(shares, [])) == sorted(items)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("preset", ["tiny", "snac_24khz", "snac_32khz"])
def test_windows_tile_every_frame_once_and_keep_away_from_edges(preset):
    from codec_jax import chunking

    config = get_preset(preset)
    rf = chunking.receptive_field(config)
    plan = corpus.BucketPlan(config, window_seconds=6.0, n_buckets=4, batch_size=3, n_devices=2)
    assert len(plan.lengths) <= 4 and all(b % config.pad_multiple == 0 for b in plan.lengths)
    assert all(v % 2 == 0 for v in plan.batch_sizes.values())  # padded to the device count
    frame_samples = [config.hop_length * s for s in config.vq_strides]
    for length in (1, config.pad_multiple, plan.window, plan.window + 1, 5 * plan.window + 123):
        segs = plan.segments(length)
        assert all(plan.bucket(s.length) in plan.lengths for s in segs)
        for level, n in enumerate(config.num_frames(length)):
            covered = np.zeros(n, int)
            for seg in segs:
                a, b = seg.keep[level]
                covered[seg.offset[level]:seg.offset[level] + b - a] += 1
                assert seg.start % config.pad_multiple == 0
                assert seg.offset[level] == (seg.start + a * frame_samples[level]) // frame_samples[level]
                if seg.start > 0:  # kept frames see nothing left of the window
                    assert a * frame_samples[level] >= rf.encoder_left
                if seg.start + seg.length < length:  # nor right of it
                    assert seg.length - b * frame_samples[level] >= rf.encoder_right
            np.testing.assert_array_equal(covered, 1)


# --------------------------------------------------------------------------- encode
@pytest.mark.slow
def test_every_good_file_coded_as_if_alone_and_bad_ones_reported(codec, reference, corpus_dir,
                                                                  encoded):
    root, bad = corpus_dir
    out, files, report = encoded
    assert report.done == len(GOOD) and report.files == len(GOOD) + len(bad)
    assert {os.path.basename(f["path"]) for f in report.failed} == bad
    reasons = {os.path.basename(f["path"]): f["reason"] for f in report.failed}
    assert reasons["cut.wav"].startswith("truncated")
    assert reasons["nan.wav"].startswith("corrupt (NaN")
    assert reasons["empty.wav"].startswith("empty")
    assert reasons["text.flac"].startswith("unreadable")
    on_disk = json.loads((out / "encode_report.json").read_text())
    assert on_disk["failed"] == report.failed and on_disk["done"] == len(GOOD)
    assert 1 <= report.programs <= 3  # bounded by the bucket count
    model_id = cf.model_identity(codec.config, codec.variables)
    for rel, (sec, sr, ch) in GOOD.items():
        got = codec_jax.load_codes(out / (rel + ".snac"))
        assert got.model_id == model_id and got.source == rel and got.channels == 1
        assert got.original_sample_rate == sr and got.sample_rate == SR
        want, margins = _whole_file(codec, reference[0], root / rel)
        assert got.length == len(audio_io.read_audio(str(root / rel), target_sample_rate=SR,
                                                      dtype="float32", mix=True).pcm)
        assert all(g.dtype == np.uint8 for g in got.codes)
        assert_same_codes(codec.config, got.codes, [w[0] for w in want], margins[0], rel)
    leftovers = [n for _, _, names in os.walk(out) for n in names if n.endswith(".tmp")]
    assert not leftovers


@pytest.mark.slow
def test_rerun_skips_finished_outputs_and_overwrite_redoes_them(codec, corpus_dir, encoded):
    root, bad = corpus_dir
    out, files, _ = encoded
    target = out / "speech/a.wav.snac"
    before = {rel: (out / (rel + ".snac")).stat().st_mtime_ns for rel in GOOD}
    os.unlink(out / "music/a.wav.snac")
    report = corpus.encode_corpus(codec, "tiny-calibrated", files, _options(out))
    assert report.skipped_existing == len(GOOD) - 1 and report.done == 1
    assert target.stat().st_mtime_ns == before["speech/a.wav"]
    assert (out / "music/a.wav.snac").exists()
    # An output made by another model is not silently replaced.
    other = codec_jax.load_pretrained("tiny")
    good = [f for f in files if f.relpath in GOOD]
    report = corpus.encode_corpus(other, "tiny", good, _options(out))
    assert report.done == 0 and len(report.failed) == len(GOOD)
    assert all("another model" in f["reason"] for f in report.failed)
    report = corpus.encode_corpus(codec, "tiny-calibrated", files, _options(out, overwrite=True))
    assert report.done == len(GOOD) and report.skipped_existing == 0


def test_separate_channels_are_coded_one_stream_each(codec, reference, corpus_dir, tmp_path):
    root, _ = corpus_dir
    rel = "speech/b.flac"
    files = [corpus.InputFile(str(root / rel), rel)]
    report = corpus.encode_corpus(codec, "tiny-calibrated", files,
                                  _options(tmp_path, channels="separate"))
    assert report.done == 1
    got = codec_jax.load_codes(tmp_path / (rel + ".snac"))
    want, margins = _whole_file(codec, reference[0], root / rel, mix=False)
    assert got.channels == 2 and all(g.shape[0] == 2 for g in got.codes)
    for ch in range(2):
        assert_same_codes(codec.config, [g[ch] for g in got.codes], [w[ch] for w in want],
                          margins[ch], f"{rel} channel {ch}")
    # decode gives the channel count back
    dec = corpus.decode_corpus(codec, corpus.collect_inputs([str(tmp_path)], (".snac",)),
                               corpus.DecodeOptions(output_dir=str(tmp_path / "audio"),
                                                    window_seconds=2.25, buckets=3,
                                                    batch_size=2, progress=False))
    assert dec.done == 1 and not dec.failed
    audio, sr = sf.read(tmp_path / "audio" / rel, always_2d=True)
    assert sr == SR and audio.shape == (got.length, 2)


# --------------------------------------------------------------------------- decode
@pytest.mark.slow
def test_decode_equals_whole_file_decode_and_refuses_other_models(codec, encoded, tmp_path):
    out, _, _ = encoded
    codes_files = corpus.collect_inputs([str(out)], (".snac",))
    opts = dict(window_seconds=2.25, buckets=3, batch_size=2, progress=False)
    report = corpus.decode_corpus(codec, codes_files,
                                  corpus.DecodeOptions(output_dir=str(tmp_path / "a"), **opts))
    assert report.done == len(GOOD) and not report.failed
    for rel in GOOD:
        c = codec_jax.load_codes(out / (rel + ".snac"))
        audio, sr = sf.read(tmp_path / "a" / rel, dtype="float32")
        assert sr == SR and audio.shape == (c.length,)
    # Whole-file decode (one compilation per length): a short clip and a windowed one.
    for rel in ("speech/a.wav", "music/a.wav"):
        c = codec_jax.load_codes(out / (rel + ".snac"))
        audio, sr = sf.read(tmp_path / "a" / rel, dtype="float32")
        assert sr == SR and audio.shape == (c.length,)
        want = np.asarray(codec.decode([x[None].astype(np.int32) for x in c.codes],
                                       length=c.length))[0]
        # written as 16-bit PCM: compare at that precision
        np.testing.assert_allclose(audio, want, atol=2 / 32768, err_msg=rel)
    other = codec_jax.load_pretrained("tiny")
    refused = corpus.decode_corpus(other, codes_files,
                                   corpus.DecodeOptions(output_dir=str(tmp_path / "b"), **opts))
    assert refused.done == 0 and len(refused.failed) == len(GOOD)
    assert all("made by model" in f["reason"] for f in refused.failed)
    assert not (tmp_path / "b" / "speech").exists()
    forced = corpus.decode_corpus(other, codes_files[:1], corpus.DecodeOptions(
        output_dir=str(tmp_path / "b"), force=True, **opts))
    assert forced.done == 1
    with pytest.raises(UsageError, match="cannot write audio"):
        corpus.check_audio_format("xyz")


# --------------------------------------------------------------------------- shards
def test_shards_read_back_through_grain_and_resume(codec, corpus_dir, encoded, tmp_path):
    import grain.python as grain

    out_files, files, _ = encoded
    out = tmp_path / "shards"
    report = corpus.encode_corpus(codec, "tiny-calibrated", files,
                                  _options(out, format="shards", shard_size=2))
    assert report.done == len(GOOD)
    manifest = json.loads((out / corpus.MANIFEST).read_text())
    assert manifest["records"] == len(GOOD) and len(manifest["shards"]) == 2
    source = corpus.open_shards(str(out))
    assert len(source) == len(GOOD)
    loader = grain.MapDataset.source(source).map(corpus.read_shard_record)
    records = {r.source: r for r in loader}
    assert set(records) == set(GOOD)
    for rel, rec in records.items():
        want = codec_jax.load_codes(out_files / (rel + ".snac"))
        assert rec.length == want.length and rec.sample_rate == SR
        for a, b in zip(rec.codes, want.codes):
            np.testing.assert_array_equal(a, b)
    # Rerun: nothing to do. Lose one shard (and a half-written one of a killed run): only
    # its files are coded again.
    again = corpus.encode_corpus(codec, "tiny-calibrated", files,
                                 _options(out, format="shards", shard_size=2))
    assert again.done == 0 and again.skipped_existing == len(GOOD)
    first = manifest["shards"][0]["file"]
    os.unlink(out / (first + corpus.INDEX_SUFFIX))
    (out / ".shard-p000-00009.array_record.tmp").write_bytes(b"partial")
    resumed = corpus.encode_corpus(codec, "tiny-calibrated", files,
                                   _options(out, format="shards", shard_size=2))
    assert resumed.done == 2 and resumed.skipped_existing == len(GOOD) - 2
    names = sorted(os.listdir(out))
    assert first not in names and not any(n.endswith(".tmp") for n in names)
    assert json.loads((out / corpus.MANIFEST).read_text())["records"] == len(GOOD)
    assert {corpus.read_shard_record(r).source for r in corpus.open_shards(str(out))} == set(GOOD)
