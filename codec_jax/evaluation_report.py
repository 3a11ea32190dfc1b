"""The listening report of `codec_jax.evaluation`: PNG plots and a self-contained HTML page.

`write_report` writes into the report directory:
  spectrogram_{best,median,worst}.png  original vs reconstruction (log-magnitude STFT);
  histograms.png                       per-file distribution of each metric;
  levels.png                           mean metric (95 % interval) vs decoder levels/bitrate;
  report.html                          the tables, the PNGs and the three files' audio
                                       (original and reconstruction), all embedded as
                                       base64 so the page works when mailed or moved.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from codec_jax.evaluation import HIGHER_IS_BETTER, METRIC_LABELS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def pick_examples(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, int]:
    """Indices (into `rows`) of the best, median and worst file by `metric` (files where
    it is undefined are skipped; with no defined value, ranks by mel distance)."""
    values = np.array([r[metric] for r in rows], np.float64)
    if not np.isfinite(values).any():
        metric = "mel_distance"
        values = np.array([r[metric] for r in rows], np.float64)
    order = [i for i in np.argsort(values, kind="stable") if np.isfinite(values[i])]
    if HIGHER_IS_BETTER[metric]:
        order = order[::-1]
    return {"best": int(order[0]), "median": int(order[len(order) // 2]), "worst": int(order[-1])}


def _log_spectrogram(audio: np.ndarray, sample_rate: int, n_fft: int = 1024):
    from scipy import signal

    freqs, times, spec = signal.stft(audio, fs=sample_rate, nperseg=n_fft, noverlap=n_fft * 3 // 4)
    return freqs, times, 20.0 * np.log10(np.maximum(np.abs(spec), 1e-6))


def spectrogram_png(path: Path, original: np.ndarray, reconstruction: np.ndarray, sample_rate: int,
                    title: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, constrained_layout=True)
    f, t, ref = _log_spectrogram(original, sample_rate)
    top = float(ref.max())
    for ax, (label, x) in zip(axes, (("original", original), ("reconstruction", reconstruction))):
        f, t, s = _log_spectrogram(x, sample_rate)
        mesh = ax.pcolormesh(t, f / 1000.0, s, vmin=top - 90.0, vmax=top, shading="auto", cmap="magma")
        ax.set_ylabel("kHz")
        ax.set_title(label, fontsize=10)
    axes[-1].set_xlabel("seconds")
    fig.colorbar(mesh, ax=axes, label="dB")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def histograms_png(path: Path, rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> None:
    plt = _pyplot()
    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), constrained_layout=True,
                             squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        values = np.array([r[m] for r in rows], np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            ax.hist(values, bins=min(30, max(5, values.size // 2)), color="#4c72b0")
            ax.axvline(values.mean(), color="k", linestyle="--", linewidth=1, label="mean")
            ax.legend(fontsize=8)
        ax.set_title(f"{METRIC_LABELS[m]} ({'higher' if HIGHER_IS_BETTER[m] else 'lower'} is better)",
                     fontsize=9)
        ax.set_ylabel("files")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def levels_png(path: Path, by_level: Mapping[str, Any], metrics: Sequence[str]) -> None:
    """Mean (with 95 % interval) of each metric against the decoder's level count."""
    plt = _pyplot()
    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), constrained_layout=True,
                             squeeze=False)
    levels = sorted(by_level, key=int)
    kbps = [by_level[k]["bitrate_bps"] / 1000.0 for k in levels]
    for ax, m in zip(axes.flat, metrics):
        mean, low, high = [], [], []
        for k in levels:
            s = by_level[k]["metrics"][m]
            mean.append(np.nan if s["mean"] is None else s["mean"])
            ci = s["ci95"] or [mean[-1], mean[-1]]
            low.append(mean[-1] - ci[0])
            high.append(ci[1] - mean[-1])
        ax.errorbar(kbps, mean, yerr=[low, high], marker="o", capsize=3)
        for x, y, k in zip(kbps, mean, levels):
            ax.annotate(f"{k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("bitrate (kbps); label: levels decoded")
        ax.set_title(METRIC_LABELS[m], fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _wav_base64(audio: np.ndarray, sample_rate: int) -> str:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.clip(audio, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _png_base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(out: Path, summary: Mapping[str, Any], rows, rows_by_level, audio, reconstructions,
                 names, *, sample_rate: int, rank_by: str, metrics: Sequence[str]) -> None:
    """PNGs + report.html into `out` (see the module docstring). `rows[i]` belongs to
    `audio[i]` / `reconstructions[i]` (float32 `[samples]`)."""
    examples = pick_examples(rows, rank_by)
    for kind, i in examples.items():
        spectrogram_png(out / f"spectrogram_{kind}.png", audio[i], reconstructions[i], sample_rate,
                        f"{kind} by {METRIC_LABELS.get(rank_by, rank_by)}: {rows[i]['file']}")
    histograms_png(out / "histograms.png", rows, metrics)
    levels_png(out / "levels.png", summary["by_level"], metrics)

    e = html.escape
    model = summary["model"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>codec evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}code{background:#f3f3f3;padding:1px 3px}</style></head><body>",
        f"<h1>Codec evaluation</h1><p>Model <code>{e(str(model['source']))}</code> "
        f"(sha256 <code>{e(model['sha256'][:16])}…</code>), {model['sample_rate']} Hz, "
        f"{model['n_levels']} levels, {summary['codes']['nominal_bitrate_bps'] / 1000:.2f} kbps; "
        f"{summary['files']} files, {summary['total_seconds']:.1f} s of audio.</p>",
        "<h2>Metrics (all levels)</h2><table><tr><th>metric</th><th>mean</th><th>95 % interval</th>"
        "<th>median</th><th>std</th><th>files</th><th>undefined</th></tr>",
    ]
    for m in metrics:
        s = summary["metrics"][m]
        ci = s["ci95"]
        parts.append(f"<tr><td>{e(METRIC_LABELS[m])}</td><td>{_fmt(s['mean'])}</td>"
                     f"<td>{'–' if ci is None else f'{ci[0]:.4g} – {ci[1]:.4g}'}</td>"
                     f"<td>{_fmt(s['median'])}</td><td>{_fmt(s['std'])}</td><td>{s['n']}</td>"
                     f"<td>{s['undefined']}</td></tr>")
    parts.append("</table><h3>How they were measured</h3><ul>")
    for key, text in summary["settings"].items():
        if key in metrics or key in ("intervals", "decoder_noise"):
            parts.append(f"<li><b>{e(key)}</b>: {e(str(text))}</li>")
    parts.append("</ul><h2>Codebook usage</h2><table><tr><th>level</th><th>codebook</th>"
                 "<th>frame rate (Hz)</th><th>codes used</th><th>usage</th><th>entropy (bits/code)</th>"
                 "<th>perplexity</th><th>headroom (bits/code)</th></tr>")
    for s in summary["codes"]["levels"]:
        parts.append(f"<tr><td>{s['level']}</td><td>{s['codebook_size']}</td><td>{s['frame_rate_hz']:.2f}</td>"
                     f"<td>{s['used']}</td><td>{s['usage']:.1%}</td><td>{s['entropy_bits']:.3f}</td>"
                     f"<td>{s['perplexity']:.1f}</td><td>{s['headroom_bits']:.3f}</td></tr>")
    parts.append(f"</table><p>Entropy-coded rate of these codes: "
                 f"{summary['codes']['entropy_bitrate_bps'] / 1000:.3f} kbps of "
                 f"{summary['codes']['nominal_bitrate_bps'] / 1000:.3f} kbps nominal.</p>")
    parts.append(f"<h2>Quality vs bitrate (decoder levels)</h2><img src='data:image/png;base64,"
                 f"{_png_base64(out / 'levels.png')}' alt='metrics vs levels'>")
    parts.append("<table><tr><th>levels</th><th>kbps</th>"
                 + "".join(f"<th>{e(METRIC_LABELS[m])}</th>" for m in metrics) + "</tr>")
    for k in sorted(summary["by_level"], key=int):
        b = summary["by_level"][k]
        parts.append(f"<tr><td>{k}</td><td>{b['bitrate_bps'] / 1000:.3f}</td>"
                     + "".join(f"<td>{_fmt(b['metrics'][m]['mean'])}</td>" for m in metrics) + "</tr>")
    parts.append("</table>")
    parts.append(f"<h2>Per-file distributions</h2><img src='data:image/png;base64,"
                 f"{_png_base64(out / 'histograms.png')}' alt='histograms'>")
    parts.append(f"<h2>Listen: best, median and worst file by {e(METRIC_LABELS.get(rank_by, rank_by))}</h2>")
    for kind, i in examples.items():
        r = rows[i]
        figures = ", ".join(f"{METRIC_LABELS[m]} {_fmt(r[m])}" for m in metrics)
        parts.append(
            f"<h3>{kind}: {e(str(r['file']))}</h3><p>{e(figures)}</p>"
            f"<p>original <audio controls src='data:audio/wav;base64,{_wav_base64(audio[i], sample_rate)}'>"
            f"</audio> reconstruction <audio controls src='data:audio/wav;base64,"
            f"{_wav_base64(reconstructions[i], sample_rate)}'></audio></p>"
            f"<img src='data:image/png;base64,{_png_base64(out / f'spectrogram_{kind}.png')}' "
            f"alt='spectrograms of {e(names[i])}'>")
    parts.append("<p>Every file's figures: <code>metrics.csv</code> (all levels) and "
                 "<code>metrics_by_level.csv</code>; summary with intervals: <code>summary.json</code>.</p>")
    parts.append("</body></html>")
    tmp = out / ".report.html.tmp"
    tmp.write_text("\n".join(parts))
    os.replace(tmp, out / "report.html")
