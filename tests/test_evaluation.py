"""codec_jax.evaluation: each metric against an independent computation, a published
conformance value or an analytic expectation; statistics against hand-computed values;
`codec-jax eval` end to end on the tiny preset."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf
from scipy import signal, stats

from codec_jax import evaluation as E
from codec_jax import losses as L
from codec_jax.errors import UsageError

SR = 16000


def speech_like(seconds: float = 1.5, sr: int = SR, seed: int = 0) -> np.ndarray:
    """A voiced, formant-shaped harmonic signal with syllable-rate pauses: PESQ's voice
    activity detector and STOI's silence removal treat it as speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = np.zeros_like(t)
    for h in range(1, 30):
        f = h * f0
        amp = sum(np.exp(-0.5 * ((f - F) / B) ** 2) for F, B in ((600, 120), (1200, 150), (2500, 200)))
        x += (amp + 0.02) * np.sin(h * phase) / math.sqrt(h)
    x *= np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) ** 0.7
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def with_noise(x: np.ndarray, snr_db: float, seed: int = 1, orthogonal: bool = False) -> np.ndarray:
    """x + white noise scaled to `snr_db`; `orthogonal` removes the noise's component along
    zero-mean x (and its mean), which makes SI-SDR equal the SNR exactly."""
    n = np.random.default_rng(seed).standard_normal(x.size)
    if orthogonal:
        xc = x - x.mean()
        n = n - n.mean()
        n = n - (n @ xc) / (xc @ xc) * xc
        power = np.mean(xc ** 2)
    else:
        power = np.mean(x.astype(np.float64) ** 2)
    n *= math.sqrt(power / np.mean(n ** 2) / 10 ** (snr_db / 10))
    return (x + n).astype(np.float32)


def low_pass(x: np.ndarray, cutoff_hz: float) -> np.ndarray:
    b, a = signal.butter(8, cutoff_hz, fs=SR)
    return signal.filtfilt(b, a, x).astype(np.float32)


def numpy_si_sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Le Roux et al. 2019, eq. (1)-(3), in float64 and without any eps."""
    s = reference.astype(np.float64) - reference.mean()
    e = estimate.astype(np.float64) - estimate.mean()
    target = (e @ s) / (s @ s) * s
    return 10 * math.log10((target @ target) / ((e - target) @ (e - target)))


# ------------------------------------------------------------------ spectral metrics


@pytest.mark.long  # three compilations of 7-scale mel graphs: ~15-50 s on 2 shared cores
def test_spectral_metrics_of_a_padded_batch_equal_each_file_alone():
    """Rows of different lengths in one zero-padded batch give each file's own
    `losses.mel_spectrogram_loss`, `multi_resolution_stft_loss` and `si_sdr`."""
    rng = np.random.default_rng(0)
    lengths = [3000, 4100]
    ref = np.zeros((2, 4608), np.float32)
    est = np.zeros_like(ref)
    for i, n in enumerate(lengths):
        ref[i, :n] = speech_like(n / SR, seed=i)
        est[i, :n] = ref[i, :n] + 0.02 * rng.standard_normal(n)
        # Junk after the end must not leak into the file's figures.
        est[i, n:] = 0.5
    got = E.spectral_metrics(ref, est, lengths, sample_rate=SR)

    @jax.jit
    def alone(e, r):
        return (L.mel_spectrogram_loss(e, r, sample_rate=SR), L.multi_resolution_stft_loss(e, r).total,
                L.si_sdr(e, r)[0])

    for i, n in enumerate(lengths):
        mel, stft, sdr = jax.device_get(alone(est[i:i + 1, :n], ref[i:i + 1, :n]))
        np.testing.assert_allclose(got["mel_distance"][i], mel, rtol=1e-5)
        np.testing.assert_allclose(got["stft_distance"][i], stft, rtol=1e-5)
        np.testing.assert_allclose(got["si_sdr_db"][i], sdr, atol=1e-3)
        np.testing.assert_allclose(got["si_sdr_db"][i], numpy_si_sdr(est[i, :n], ref[i, :n]), atol=2e-3)


def test_identity_noise_and_low_pass_on_spectral_metrics():
    x = speech_like()
    n = x.size
    cases = {
        "identity": x,
        "orth_20": with_noise(x, 20.0, orthogonal=True),
        "orth_5": with_noise(x, 5.0, orthogonal=True),
        "white_10": with_noise(x, 10.0),
        "lp_3k": low_pass(x, 3000.0),
        "lp_1k": low_pass(x, 1000.0),
    }
    names = list(cases)
    got = E.spectral_metrics(np.stack([x] * len(names)), np.stack([cases[k] for k in names]),
                             [n] * len(names), sample_rate=SR)
    v = {m: dict(zip(names, got[m])) for m in got}
    assert v["mel_distance"]["identity"] == pytest.approx(0.0, abs=1e-6)
    assert v["stft_distance"]["identity"] == pytest.approx(0.0, abs=1e-5)
    # eps 1e-8 on both energies: 10 log10(energy / 1e-8) for a perfect reconstruction.
    energy = float(np.sum((x - x.mean()).astype(np.float64) ** 2))
    assert v["si_sdr_db"]["identity"] == pytest.approx(10 * math.log10(energy / 1e-8), abs=0.5)
    # Noise orthogonal to the signal: SI-SDR is the SNR exactly (float32 rounding only).
    assert v["si_sdr_db"]["orth_20"] == pytest.approx(20.0, abs=0.01)
    assert v["si_sdr_db"]["orth_5"] == pytest.approx(5.0, abs=0.01)
    # Independent white noise: SI-SDR = SNR up to the chance correlation <n, x>, whose
    # standard deviation relative to the noise energy is ~ sqrt(1/N): well under 0.1 dB.
    assert v["si_sdr_db"]["white_10"] == pytest.approx(10.0, abs=10 * math.log10(1 + 4 / math.sqrt(n)) + 0.02)
    # More noise, and a lower cut-off, are worse on both spectral distances.
    for m in ("mel_distance", "stft_distance"):
        assert 0 < v[m]["orth_20"] < v[m]["orth_5"]
        assert 0 < v[m]["lp_3k"] < v[m]["lp_1k"]


def test_spectral_metrics_reject_clips_shorter_than_the_mel_window():
    x = np.zeros((1, 900), np.float32)
    with pytest.raises(ValueError, match="at least 1025 samples"):
        E.spectral_metrics(x, x, sample_rate=SR)


# ---------------------------------------------------------------- perceptual metrics


@pytest.mark.slow
def test_perceptual_identity_reaches_the_published_maxima():
    x = speech_like()
    values = E.perceptual_metrics_one(x, x, SR, visqol_mode="speech")
    # P.862.2's MOS-LQO mapping tops out at 4.644; STOI of identical signals is 1;
    # ViSQOL speech mode scales the best similarity to MOS 5.
    assert values["pesq_wb"] == pytest.approx(4.644, abs=0.001)
    assert values["stoi"] == pytest.approx(1.0, abs=1e-6)
    assert values["visqol"] == pytest.approx(5.0, abs=1e-3)


def test_perceptual_metrics_fall_with_snr_and_cut_off():
    x = speech_like()
    snrs = (30.0, 20.0, 10.0, 0.0)
    results = [E.perceptual_metrics_one(x, with_noise(x, s), SR, visqol_mode="speech") for s in snrs]
    for m in ("pesq_wb", "stoi", "visqol"):
        series = [r[m] for r in results]
        assert all(a > b for a, b in zip(series, series[1:])), (m, series)
    lp3, lp1 = (E.perceptual_metrics_one(x, low_pass(x, c), SR, visqol_mode="speech") for c in (3000.0, 1000.0))
    for m in ("pesq_wb", "stoi", "visqol"):
        assert lp1[m] < lp3[m] < (4.644 if m == "pesq_wb" else 1.0 if m == "stoi" else 5.0), (m, lp3, lp1)


def test_visqol_audio_mode_resamples_to_48k_and_ranks_noise_below_identity():
    x = speech_like(1.0)
    clean = E.perceptual_metrics_one(x, x, SR, pesq=False, stoi=False, visqol_mode="audio")["visqol"]
    noisy = E.perceptual_metrics_one(x, with_noise(x, 20.0), SR, pesq=False, stoi=False,
                                     visqol_mode="audio")["visqol"]
    assert 4.5 < clean <= 5.0  # audio mode's SVR maps identical inputs to ~4.73
    assert noisy < clean - 0.5


def test_metrics_that_cannot_be_computed_are_undefined_not_errors():
    silence = np.zeros(SR, np.float32)
    values = E.perceptual_metrics_one(silence, silence, SR, stoi=False)
    assert math.isnan(values["pesq_wb"])  # P.862 finds no utterance
    short = speech_like(0.1)
    for mode in ("speech", "audio"):  # shorter than one ViSQOL patch; PESQ needs 0.25 s
        values = E.perceptual_metrics_one(short, short, SR, stoi=False, visqol_mode=mode)
        assert math.isnan(values["visqol"]) and math.isnan(values["pesq_wb"])


def test_visqol_mode_follows_the_sample_rate():
    assert E.visqol_mode_for(24000) == "speech"
    assert E.visqol_mode_for(16000) == "speech"
    assert E.visqol_mode_for(32000) == "audio"
    assert E.visqol_mode_for(44100) == "audio"
    assert E.visqol_mode_for(44100, "speech") == "speech"
    with pytest.raises(UsageError):
        E.visqol_mode_for(24000, "music")


def test_reconstruction_metrics_pool_matches_inline_values():
    """The trainer's entry point: worker processes give the figures computed in-process."""
    x = np.stack([speech_like(seed=0), speech_like(seed=1)])
    y = np.stack([with_noise(x[0], 15.0), low_pass(x[1], 2000.0)])
    pooled = E.reconstruction_metrics(x, y, sample_rate=SR, perceptual=True, visqol=False, workers=2)
    inline = [E.perceptual_metrics_one(a, b, SR) for a, b in zip(x, y)]
    for m in ("pesq_wb", "stoi"):
        assert pooled[m] == pytest.approx(np.mean([r[m] for r in inline]), rel=1e-9)
    assert pooled["si_sdr_db"] == pytest.approx(np.mean([numpy_si_sdr(b, a) for a, b in zip(x, y)]), abs=1e-2)
    assert "visqol" not in pooled


# ------------------------------------------------------------------------- statistics


def test_code_statistics_match_hand_computed_distributions():
    s = E.code_statistics(np.array([2, 1, 1, 0]))  # p = 1/2, 1/4, 1/4
    assert s["entropy_bits"] == pytest.approx(1.5)
    assert s["perplexity"] == pytest.approx(2 ** 1.5)
    assert s["headroom_bits"] == pytest.approx(0.5)
    assert (s["used"], s["usage"], s["codes"]) == (3, 0.75, 4)
    uniform = E.code_statistics(np.r_[np.full(16, 7), np.zeros(48)])
    assert uniform["entropy_bits"] == pytest.approx(4.0)
    assert uniform["perplexity"] == pytest.approx(16.0)
    assert uniform["headroom_bits"] == pytest.approx(2.0)
    one = E.code_statistics(np.r_[5, np.zeros(7)])
    assert (one["entropy_bits"], one["perplexity"]) == (0.0, 1.0)


def test_interval_summary_agrees_with_the_t_interval_on_normal_data():
    values = np.random.default_rng(3).normal(2.0, 0.5, size=400)
    s = E.interval_summary(values, resamples=4000)
    half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    assert s["mean"] == pytest.approx(values.mean())
    assert s["median"] == pytest.approx(np.median(values))
    low, high = s["ci95"]
    assert low == pytest.approx(values.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.15 * half)


def test_interval_summary_edge_cases():
    s = E.interval_summary([1.0, math.nan, 3.0, math.nan, 2.0])
    assert (s["n"], s["undefined"], s["mean"]) == (3, 2, 2.0)
    assert s["ci95"][0] < 2.0 < s["ci95"][1]
    assert E.interval_summary([4.0, 4.0, 4.0])["ci95"] == [4.0, 4.0]
    assert E.interval_summary([4.0])["ci95"] is None
    assert E.interval_summary([math.nan])["mean"] is None


# ----------------------------------------------------------------- inputs, identity, CLI


def test_expand_inputs_takes_files_directories_and_lists(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for p in ("a.wav", "d/b.flac", "d/sub/c.wav", "d/notes.txt"):
        (tmp_path / p).write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("# eval set\na.wav\n\nd/sub/c.wav\n")
    got = E.expand_inputs([f"@{listing}", str(tmp_path / "d"), str(tmp_path / "a.wav")])
    # The same file twice (list and directory) is kept once; outputs are named by relpath.
    assert [f.path.replace(str(tmp_path) + "/", "") for f in got] == ["a.wav", "d/b.flac", "d/sub/c.wav"]
    assert [f.relpath for f in got] == ["a.wav", "b.flac", "d/sub/c.wav"]
    listing.write_text("a.wav\nmissing.wav\n")
    with pytest.raises(UsageError, match="missing.wav: no such file"):
        E.expand_inputs([f"@{listing}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no audio files"):
        E.expand_inputs([str(tmp_path / "empty")])


def test_model_identity_changes_with_any_weight():
    import types

    from codec_jax.config import get_preset
    from codec_jax.nn.quantizer import QuantizerConfig

    def stand_in(variables):  # what model_identity reads from a Codec
        return types.SimpleNamespace(config=get_preset("tiny"), quantizer=QuantizerConfig(),
                                     variables=variables, sample_rate=16000, dtype="float32")

    rng = np.random.default_rng(0)
    variables = {"params": {"a": {"kernel": rng.standard_normal((3, 4)).astype(np.float32)},
                            "b": rng.standard_normal(5).astype(np.float32)}}
    first = E.model_identity(stand_in(variables), "tiny")["sha256"]
    copy = jax.tree_util.tree_map(np.copy, variables)
    assert E.model_identity(stand_in(copy), "elsewhere")["sha256"] == first
    copy["params"]["b"][2] += 1e-6
    assert E.model_identity(stand_in(copy), "tiny")["sha256"] != first
    renamed = {"params": {"a": variables["params"]["a"], "c": variables["params"]["b"]}}
    assert E.model_identity(stand_in(renamed), "tiny")["sha256"] != first


def test_eval_help_does_not_import_jax():
    code = ("import sys\nfrom codec_jax.cli import main\ntry:\n    main(['eval', '--help'])\n"
            "except SystemExit:\n    pass\nassert 'jax' not in sys.modules, 'jax imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--visqol-mode" in out.stdout


@pytest.mark.long  # ~60 s on 2 cores: compiles the tiny codec and the metrics for 3 level counts
def test_eval_command_end_to_end_on_the_tiny_preset(tmp_path):
    """Three files of one padded length in a batch of 4 rows: the saved reconstructions are
    those of each file coded alone, the CSVs and summary agree with them, and the report
    embeds audio and plots."""
    import codec_jax
    from codec_jax.cli import main

    codec = codec_jax.load_pretrained("tiny")
    (tmp_path / "in").mkdir()
    n = int(1.5 * SR)  # STOI needs ~0.6 s of voiced frames
    clips = [speech_like(n / SR, seed=i) for i in range(3)]
    for i, x in enumerate(clips):
        sf.write(tmp_path / "in" / f"clip{i}.wav", x, SR, subtype="PCM_16")
    out = tmp_path / "report"
    argv = ["eval", "tiny", str(tmp_path / "in"), "--out", str(out), "--save-audio", "--workers", "2",
            "--batch-size", "4", "--no-visqol", "--quiet", "--bootstrap-resamples", "500"]
    assert main(argv) == 0

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    by_level = list(csv.DictReader(open(out / "metrics_by_level.csv")))
    summary = json.loads((out / "summary.json").read_text())
    assert [r["file"].rsplit("/", 1)[-1] for r in rows] == ["clip0.wav", "clip1.wav", "clip2.wav"]
    assert len(by_level) == 3 * codec.config.n_levels
    assert {r["n_levels"] for r in rows} == {str(codec.config.n_levels)}
    assert float(rows[0]["bitrate_bps"]) == codec.config.bitrate()
    assert {int(r["n_levels"]) for r in by_level} == set(range(1, codec.config.n_levels + 1))
    assert all(r["visqol"] == "" for r in rows)

    for i, x in enumerate(clips):
        pcm = sf.read(tmp_path / "in" / f"clip{i}.wav", dtype="float32")[0]
        alone = np.asarray(codec.decode(codec.encode(pcm[None])))[0, :n]
        saved = sf.read(out / "audio" / f"clip{i}.wav", dtype="float32")[0]
        np.testing.assert_allclose(saved, np.clip(alone, -1, 1), atol=1.5 / 32768)
        expected = E.spectral_metrics(pcm[None], alone[None], sample_rate=SR)
        assert float(rows[i]["mel_distance"]) == pytest.approx(expected["mel_distance"][0], rel=1e-4)
        assert float(rows[i]["si_sdr_db"]) == pytest.approx(expected["si_sdr_db"][0], abs=1e-3)
        inline = E.perceptual_metrics_one(pcm, alone, SR)
        assert float(rows[i]["pesq_wb"]) == pytest.approx(inline["pesq_wb"], rel=1e-5)
        assert float(rows[i]["stoi"]) == pytest.approx(inline["stoi"], rel=1e-5)

    mel = [float(r["mel_distance"]) for r in rows]
    assert summary["metrics"]["mel_distance"]["mean"] == pytest.approx(np.mean(mel), rel=1e-5)
    assert summary["metrics"]["mel_distance"]["median"] == pytest.approx(np.median(mel), rel=1e-5)
    assert "visqol" not in summary["metrics"]
    # Every code frame that covers a file's samples is counted once.
    for level, s in enumerate(summary["codes"]["levels"]):
        frames = math.ceil(n / (codec.config.hop_length * codec.config.vq_strides[level]))
        assert s["codes"] == 3 * frames
        assert s["codebook_size"] == codec.config.codebook_size
    assert summary["model"]["sha256"] == E.model_identity(codec, "tiny")["sha256"]
    page = (out / "report.html").read_text()
    assert page.count("data:audio/wav;base64,") == 6
    assert page.count("data:image/png;base64,") == 5
    for png in ("spectrogram_best", "spectrogram_median", "spectrogram_worst", "histograms", "levels"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run into the same directory is refused: no report is lost.
    assert main(argv) == 2


# Enabled: ~40 s on 2 cores (spawns the worker pool, numba-compiles ViSQOL's kernels).
@pytest.mark.parametrize("enabled", [pytest.param(True, marks=pytest.mark.long), False])
def test_trainer_eval_logs_perceptual_metrics_when_enabled(tmp_path, enabled):
    """`logging.eval_perceptual` adds PESQ/STOI/ViSQOL of the eval clips to metrics.jsonl,
    with the values `reconstruction_metrics` gives for the same clips."""
    import jax.numpy as jnp

    from codec_jax.configs import tiny
    from codec_jax.data import pipeline
    from codec_jax.training import loop
    from codec_jax.training import metrics as tm
    from codec_jax.training import sharding as shard_lib

    config = tiny.get_config()
    config.data.crop_seconds = 1.0
    config.logging.eval_batches = 1
    config.logging.eval_batch_size = 2
    config.logging.num_audio_samples = 0
    config.logging.eval_perceptual = enabled

    def degrade(audio):
        return 0.7 * audio + 0.05 * jnp.roll(audio, 7, axis=1)

    def fake_eval_step(state, batch):  # stands in for the generator: a fixed degradation
        return {"mel": jnp.float32(1.0)}, degrade(batch["audio"])

    writer = tm.create_writer(str(tmp_path), jsonl=True)
    loop._evaluate(config, None, fake_eval_step, shard_lib.create_mesh(-1, 1), writer, 5)
    writer.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 5 and row["eval/mel"] == 1.0
    if not enabled:
        assert not any(k in row for k in ("eval/pesq_wb", "eval/stoi", "eval/visqol"))
        return
    it = pipeline.create_eval_iterator(config.data, batch_size=2, num_batches=1, seed=int(config.train.seed))
    audio = next(iter(it))["audio"]
    it.close()
    expected = E.reconstruction_metrics(audio, np.asarray(degrade(jnp.asarray(audio))), sample_rate=SR,
                                        spectral=False, perceptual=True, workers=0)
    for m in ("pesq_wb", "stoi", "visqol"):
        got, want = row[f"eval/{m}"], expected[m]
        if isinstance(got, str) or math.isnan(want):  # undefined for every clip: logged as "nan"
            assert got == "nan" and math.isnan(want), (m, got, want)
        else:
            assert got == pytest.approx(want, rel=1e-6), m


def test_batch_widths_are_bucketed_to_few_shapes():
    import types

    from codec_jax.config import get_preset

    codec = types.SimpleNamespace(config=get_preset("tiny"))
    unit = codec.config.pad_multiple
    widths = [E._group_length(codec, units * unit) // unit for units in range(1, 14)]
    assert widths == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
    assert E._group_length(codec, unit + 1) == 2 * unit  # padded to whole units first


def test_quality_curve_rows_and_plot(tmp_path):
    """The curve script's CSV row from an eval summary, and the plot of such rows."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))
    import quality_curve

    def summary(pesq, usage):
        stat = lambda m: {"mean": m, "ci95": [m - 0.1, m + 0.1], "n": 3, "undefined": 0}  # noqa: E731
        return {"metrics": {"pesq_wb": stat(pesq), "stoi": stat(0.8), "mel_distance": stat(1.0),
                            "stft_distance": stat(2.0), "si_sdr_db": stat(3.0)},
                "codes": {"levels": [{"usage": usage, "entropy_bits": 9.5}, {"usage": 0.5, "entropy_bits": 8.0}],
                          "entropy_bitrate_bps": 1500.0, "nominal_bitrate_bps": 1960.0},
                "files": 3, "settings": {"visqol_mode": None}, "model": {"sha256": "ab" * 32}}

    csv_path = tmp_path / "curve.csv"
    state = {"train_seconds": 90.0, "accelerators": 2}
    for step, pesq in ((100, 1.5), (200, 2.5)):
        row = quality_curve._row(step, state, summary(pesq, 0.25), 30.0, audio_seconds_per_step=16.0)
        quality_curve._append_row(csv_path, row)
    rows = quality_curve._read_rows(csv_path)
    assert [r["step"] for r in rows] == ["100", "200"]
    assert rows[0]["gpu_minutes"] == "3.00"  # 90 s x 2 accelerators
    assert rows[1]["audio_hours_seen"] == f"{200 * 16 / 3600:.2f}"
    assert (rows[1]["pesq_wb"], rows[1]["pesq_wb_ci_low"]) == ("2.5", "2.4")
    assert rows[0]["visqol"] == "" and rows[0]["code_usage_per_level"] == "0.250 0.500"
    png = tmp_path / "curve.png"
    quality_curve.plot_quality_curve(csv_path, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
