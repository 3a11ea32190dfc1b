"""Quality against training compute: train a codec in resumable segments, export it at
fixed steps, measure each export with `codec-jax eval` on the validation files, and keep
one CSV row per step; `plot` draws the curve.

    # one H200, SNAC 24 kHz (EMA codebooks) on the demo speech set; call again to go on
    python bench/quality_curve.py run --workdir bench_out/quality_curve \
        --source-dir bench_out/klettres --time-limit-minutes 9
    python bench/quality_curve.py plot bench_out/quality_curve/quality_curve.csv \
        --png docs/quality_curve.png

    # the whole pipeline on a CPU in a few minutes (tiny preset, a handful of steps)
    python bench/quality_curve.py run --workdir /tmp/qc --config tiny --steps 2,4 \
        --source-dir /tmp/some_wavs --dataset qc_tiny_16k --set train.batch_size=2

On a lent H200 (no network; at most 10 minutes a command, so one call per segment): the
demo audio (/usr/share/klettres, 47 MB of ogg) and the wheels (.whl/, with this script's
pesq, libsvm-official, pystoi and visqol-python built for CPython 3.12) travel as ignored
paths, and the workdir stays on the machine between back-to-back calls:

    cp -r /usr/share/klettres workdir_klettres          # once, on the dev machine
    # device command (carry: .whl, workdir_klettres); repeat it to go on:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
      export PYTHONPATH=$PWD:/tmp/site && \
      python3 bench/quality_curve.py run --workdir workdir_qc --source-dir workdir_klettres \
        --data-dir workdir_qc/tfds --steps 500,1000,2000,4000,8000,16000 \
        --time-limit-minutes 9 && \
      python3 bench/quality_curve.py plot workdir_qc/quality_curve.csv --png $OUT/quality_curve.png && \
      cp workdir_qc/quality_curve.csv $OUT/

At ~66 ms per GAN step (BENCHMARKS.md, H200, batch 16 x 1 s) a 9-minute call trains about
6000 steps after compilation.

What a call does, each step skipped when already done (so repeated calls resume):
  1. dataset: `codec-jax prepare-data --source-dir` into `--data-dir` unless the TFDS
     dataset is there (scripts/prepare_demo_data.sh builds `klettres_speech_24k` from the
     Debian package; a machine without network can be handed /usr/share/klettres);
  2. validation files: the dataset's validation split written once as wav files
     (`<workdir>/validation/`), the same files at every step;
  3. for each target step: `codec-jax train` up to that step (the trainer resumes from
     its checkpoint; XLA's compilation cache lives in `<workdir>/jax_cache`), stopped
     with SIGTERM (the trainer then saves a checkpoint) when the call's time runs out;
     its wall time is added to the run's GPU-minutes;
  4. `codec-jax eval` of the export (`<workdir>/exports/<step>`) into
     `<workdir>/evals/<step>/`, and one row appended to `<workdir>/quality_curve.csv`.

GPU-minutes count the training processes' wall time (start-up and compilation included)
times the number of local accelerators; evaluation time is recorded apart (eval_minutes).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_STEPS = "500,1000,2000,5000,10000,20000,50000,100000"
CSV_COLUMNS = (
    "step", "gpu_minutes", "audio_hours_seen", "eval_minutes",
    "pesq_wb", "pesq_wb_ci_low", "pesq_wb_ci_high", "stoi", "stoi_ci_low", "stoi_ci_high",
    "visqol", "visqol_ci_low", "visqol_ci_high", "mel_distance", "stft_distance", "si_sdr_db",
    "code_usage_per_level", "entropy_bits_per_level", "entropy_kbps", "nominal_kbps",
    "files", "visqol_mode", "model_sha256",
)

_CONFIG_TEMPLATE = '''"""Written by bench/quality_curve.py: {base} on TFDS {dataset}; the variant is num_steps."""
import json

from codec_jax.configs import {base} as base


def get_config(arg):
    c = base.get_config({variant!r})
    settings = json.loads(open({settings!r}).read())
    c.data.sources = [{{"kind": "tfds", "name": settings["dataset"], "data_dir": settings["data_dir"],
                       "weight": 1.0}}]
    c.data.eval_sources = [{{"kind": "tfds", "name": settings["dataset"],
                            "data_dir": settings["data_dir"], "weight": 1.0}}]
    c.train.num_steps = int(arg)
    c.train.compilation_cache_dir = settings["cache_dir"]
    c.checkpoint.every_steps = settings["checkpoint_every"]
    # The curve evaluates whole validation files itself; the trainer's eval (crops, at
    # every segment end) would only add time to the GPU-minutes.
    c.logging.eval_every_steps = 0
    for key, value in settings["overrides"].items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c
'''


def _log(msg: str) -> None:
    print(f"[quality_curve {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set wants KEY=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key, parsed


def _codec_jax(*args: str, env: dict | None = None, timeout: float | None = None) -> int:
    """Runs `python -m codec_jax ARGS`; on timeout sends SIGTERM (the trainer then saves a
    checkpoint), waits up to 5 minutes for it, and returns -SIGTERM."""
    cmd = [sys.executable, "-m", "codec_jax", *args]
    _log(" ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _log("time is up: SIGTERM to the trainer (it saves a checkpoint)")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return -signal.SIGTERM


def _local_accelerators() -> int:
    code = "import jax; d = jax.local_devices(); print(len(d) if d[0].platform != 'cpu' else 1)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _dataset_ready(data_dir: Path, name: str) -> bool:
    return any((data_dir / name).glob("*/dataset_info.json"))


def write_validation_files(data_dir: Path, dataset: str, out: Path, limit: int | None) -> list[Path]:
    """The validation split's records as 16-bit wav files (once; later calls reuse them)."""
    done = out / "files.txt"
    if done.exists():
        return [out / line for line in done.read_text().split()]
    import numpy as np
    import soundfile as sf

    from codec_jax.data.pipeline import open_tfds_source

    source = open_tfds_source(dataset, str(data_dir), "validation")
    out.mkdir(parents=True, exist_ok=True)
    names = []
    count = len(source) if limit is None else min(limit, len(source))
    for i in range(count):
        record = source[i]
        pcm = np.asarray(record["audio"], np.int16)
        rate = int(record["sample_rate"])
        stem = Path(record["path"].decode() if isinstance(record["path"], bytes) else str(record["path"])).stem
        name = f"{i:04d}_{stem}.wav"
        sf.write(out / name, pcm, rate, subtype="PCM_16")
        names.append(name)
    done.write_text("\n".join(names) + "\n")
    _log(f"wrote {len(names)} validation files to {out}")
    return [out / n for n in names]


def _latest_checkpoint(train_dir: Path) -> int:
    ckpts = [int(p.name) for p in (train_dir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(ckpts, default=0)


def _median_step_time(train_dir: Path) -> float | None:
    """The median of the trainer's logged step times (metrics.jsonl); None before any."""
    path = train_dir / "metrics.jsonl"
    times = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            t = json.loads(line).get("train/perf/step_time_s")
        except json.JSONDecodeError:
            continue
        if t:
            times.append(float(t))
    return sorted(times)[len(times) // 2] if times else None


def _reachable_step(reached: int, step_time: float, seconds: float, restart_seconds: float) -> int | None:
    """The step (rounded down to 100) a trainer restarted at `reached` gets to in
    `seconds`; None if not even 100 steps more."""
    more = int(max(0.0, seconds - restart_seconds) / step_time) // 100 * 100
    return reached + more if more > 0 else None


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _row(step: int, state: dict, summary: dict, eval_seconds: float, audio_seconds_per_step: float) -> dict:
    metrics = summary["metrics"]

    def mean(name):
        s = metrics.get(name)
        return "" if not s or s["mean"] is None else f"{s['mean']:.5g}"

    def ci(name, i):
        s = metrics.get(name)
        return "" if not s or not s["ci95"] else f"{s['ci95'][i]:.5g}"

    levels = summary["codes"]["levels"]
    return {
        "step": step,
        "gpu_minutes": f"{state['train_seconds'] * state['accelerators'] / 60:.2f}",
        "audio_hours_seen": f"{step * audio_seconds_per_step / 3600:.2f}",
        "eval_minutes": f"{eval_seconds / 60:.2f}",
        "pesq_wb": mean("pesq_wb"), "pesq_wb_ci_low": ci("pesq_wb", 0), "pesq_wb_ci_high": ci("pesq_wb", 1),
        "stoi": mean("stoi"), "stoi_ci_low": ci("stoi", 0), "stoi_ci_high": ci("stoi", 1),
        "visqol": mean("visqol"), "visqol_ci_low": ci("visqol", 0), "visqol_ci_high": ci("visqol", 1),
        "mel_distance": mean("mel_distance"), "stft_distance": mean("stft_distance"),
        "si_sdr_db": mean("si_sdr_db"),
        "code_usage_per_level": " ".join(f"{s['usage']:.3f}" for s in levels),
        "entropy_bits_per_level": " ".join(f"{s['entropy_bits']:.2f}" for s in levels),
        "entropy_kbps": f"{summary['codes']['entropy_bitrate_bps'] / 1000:.3f}",
        "nominal_kbps": f"{summary['codes']['nominal_bitrate_bps'] / 1000:.3f}",
        "files": summary["files"],
        "visqol_mode": summary["settings"].get("visqol_mode") or "",
        "model_sha256": summary["model"]["sha256"][:16],
    }


def _base_config(name: str, variant: str, overrides: dict):
    import importlib

    config = importlib.import_module(f"codec_jax.configs.{name}").get_config(variant or None)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def run(args) -> int:
    t_call = time.monotonic()
    deadline = t_call + args.time_limit_minutes * 60 if args.time_limit_minutes else None
    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    data_dir = Path(os.path.expanduser(args.data_dir)).absolute()
    steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    if not steps or steps[0] < 1:
        raise SystemExit("--steps must be positive step counts, e.g. 500,1000,2000")

    if not _dataset_ready(data_dir, args.dataset):
        if not args.source_dir:
            raise SystemExit(f"TFDS dataset {args.dataset} is not in {data_dir}: run "
                             "scripts/prepare_demo_data.sh, or pass --source-dir AUDIO_FOLDER")
        rate = _base_config(args.config, args.variant, {}).data.sample_rate
        if _codec_jax("prepare-data", args.source_dir, "--name", args.dataset, "--data-dir",
                      str(data_dir), "--sample-rate", str(rate)) != 0:
            raise SystemExit("prepare-data failed")

    val_files = write_validation_files(data_dir, args.dataset, work / "validation", args.eval_files)
    listing = work / "validation" / "eval_list.txt"
    listing.write_text("\n".join(p.name for p in val_files) + "\n")

    settings = {"dataset": args.dataset, "data_dir": str(data_dir), "cache_dir": str(work / "jax_cache"),
                "checkpoint_every": args.checkpoint_every,
                "overrides": dict(_parse_override(s) for s in args.set)}
    (work / "curve_settings.json").write_text(json.dumps(settings, indent=2))
    config_path = work / "curve_config.py"
    config_path.write_text(_CONFIG_TEMPLATE.format(base=args.config, dataset=args.dataset,
                                                   variant=args.variant,
                                                   settings=str(work / "curve_settings.json")))
    state_path = work / "curve_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"train_seconds": 0.0}
    if "accelerators" not in state:
        state["accelerators"] = _local_accelerators()
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(work / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1")
    train_dir = work / "train"
    csv_path = work / "quality_curve.csv"
    done = {int(r["step"]) for r in _read_rows(csv_path)}

    base_cfg = _base_config(args.config, args.variant, settings["overrides"])
    audio_seconds_per_step = base_cfg.train.batch_size * base_cfg.data.crop_seconds
    step_time = _median_step_time(train_dir) if args.fit_last_step and deadline is not None else None
    reached = _latest_checkpoint(train_dir)
    if step_time is not None and reached > 0:
        seconds = deadline - time.monotonic() - args.eval_reserve_minutes * 60
        reachable = _reachable_step(reached, step_time, seconds, args.restart_seconds)
        # Each listed step before it costs an evaluation and a trainer restart on the way.
        for _ in range(3):
            if reachable is None:
                break
            before = [s for s in steps if s not in done and s < reachable]
            reachable = _reachable_step(
                reached, step_time,
                seconds - len(before) * (args.eval_reserve_minutes * 60 + args.restart_seconds),
                args.restart_seconds)
        if reachable is not None and not any(s in done for s in steps if s >= reachable):
            # The last call's training after the last listed step would otherwise end in a
            # checkpoint that no row measures; end the run at a step this call can reach.
            steps = [s for s in steps if s < reachable] + [reachable]
            _log(f"this call can reach step {reachable}: steps {steps}")

    for step in steps:
        if step in done:
            continue
        export = work / "exports" / str(step)
        if not (export / "config.json").exists():
            reached = _latest_checkpoint(train_dir)
            if reached > step:
                raise SystemExit(f"the run is at step {reached}, past {step}, and has no export for "
                                 f"{step}: list steps in increasing order from the start")
            remaining = None if deadline is None else deadline - time.monotonic() - args.eval_reserve_minutes * 60
            if remaining is not None and remaining < 60:
                _log(f"out of time before step {step}; call again to continue")
                return 0
            t0 = time.monotonic()
            rc = _codec_jax("train", "--config", f"{config_path}:{step}", "--workdir", str(train_dir),
                            env=env, timeout=remaining)
            state["train_seconds"] += time.monotonic() - t0
            state_path.write_text(json.dumps(state, indent=2))
            # Stopped by the time limit after its last step: the trainer still wrote the
            # export (SIGTERM saves and exports), so the step is done; evaluate it.
            finished = (train_dir / "export").exists() and _latest_checkpoint(train_dir) >= step
            if rc != 0 and not finished:
                if rc == -signal.SIGTERM:
                    _log(f"stopped at step {_latest_checkpoint(train_dir)} of {step}; call again to resume")
                    return 0
                raise SystemExit(f"codec-jax train exited with {rc}")
            if (train_dir / "export").exists():
                export.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(train_dir / "export"), str(export))
            else:
                raise SystemExit(f"training reached step {step} but wrote no export")
        if args.no_eval:
            _log(f"step {step}: exported to {export}; evaluation skipped (--no-eval)")
            continue
        t0 = time.monotonic()
        eval_dir = work / "evals" / str(step)
        # All levels only: the curve records full-bitrate quality (fewer shapes to compile).
        eval_args = ["eval", str(export), f"@{listing}", "--out", str(eval_dir), "--overwrite",
                     "--batch-size", str(args.eval_batch_size), "--levels", "full", "--quiet"]
        if args.no_visqol:
            eval_args.append("--no-visqol")
        if _codec_jax(*eval_args, env=env) != 0:
            raise SystemExit(f"codec-jax eval of step {step} failed")
        summary = json.loads((eval_dir / "summary.json").read_text())
        row = _row(step, state, summary, time.monotonic() - t0, audio_seconds_per_step)
        _append_row(csv_path, row)
        _log("step {step}: {gpu_minutes} GPU-min, PESQ-wb {pesq_wb}, STOI {stoi}, ViSQOL {visqol}, "
             "mel {mel_distance}, SI-SDR {si_sdr_db} dB, usage {code_usage_per_level}".format(**row))
    _log(f"all steps done: {csv_path}")
    return 0


def plot_quality_curve(csv_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> None:
    """Each metric of the CSV against GPU-minutes (log x when they span decades), step
    numbers as labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = _read_rows(Path(csv_path))
    if not rows:
        raise SystemExit(f"{csv_path} has no rows")
    rows.sort(key=lambda r: int(r["step"]))
    x = [max(float(r["gpu_minutes"]), 1e-3) for r in rows]
    panels = [("pesq_wb", "PESQ-wb", True), ("stoi", "STOI", True), ("visqol", "ViSQOL MOS-LQO", True),
              ("mel_distance", "mel distance (lower is better)", False),
              ("si_sdr_db", "SI-SDR (dB)", False), ("code_usage_per_level", "codebook usage per level", False)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for ax, (key, label, with_ci) in zip(axes.flat, panels):
        if key == "code_usage_per_level":
            per_level = [[float(v) for v in r[key].split()] for r in rows]
            for level in range(len(per_level[0])):
                ax.plot(x, [p[level] for p in per_level], marker="o", label=f"level {level}")
            ax.legend(fontsize=8)
        else:
            y = [float(r[key]) if r[key] else float("nan") for r in rows]
            if with_ci and all(r.get(f"{key}_ci_low") for r in rows):
                low = [y_ - float(r[f"{key}_ci_low"]) for y_, r in zip(y, rows)]
                high = [float(r[f"{key}_ci_high"]) - y_ for y_, r in zip(y, rows)]
                ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3)
            else:
                ax.plot(x, y, marker="o")
            for xi, yi, r in zip(x, y, rows):
                ax.annotate(r["step"], (xi, yi), textcoords="offset points", xytext=(3, 4), fontsize=7)
        if max(x) / min(x) > 20:  # steps 500 .. 100k span decades of compute
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("training GPU-minutes (labels: steps)")
        ax.set_title(label, fontsize=10)
    fig.suptitle(title or f"quality vs training compute ({rows[-1]['files']} validation files, "
                          f"{rows[-1]['nominal_kbps']} kbps)", fontsize=11)
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train/export/evaluate up to the next steps (resumable)")
    r.add_argument("--workdir", required=True)
    r.add_argument("--config", default="snac_24khz", help="a module of codec_jax/configs")
    r.add_argument("--variant", default="", help="config variant, e.g. factorized (default: EMA)")
    r.add_argument("--dataset", default="klettres_speech_24k")
    r.add_argument("--data-dir", default=os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    r.add_argument("--source-dir", default="", help="audio folder to prepare the dataset from if missing")
    r.add_argument("--steps", default=DEFAULT_STEPS, help="export and evaluate at these steps")
    r.add_argument("--time-limit-minutes", type=float, default=0.0,
                   help="stop (checkpointed) before this much wall time; 0: no limit")
    r.add_argument("--eval-reserve-minutes", type=float, default=2.0,
                   help="time kept free for the evaluation after a segment")
    r.add_argument("--checkpoint-every", type=int, default=500)
    r.add_argument("--fit-last-step", action="store_true",
                   help="this is the last call: end the run at the furthest step it can reach "
                        "(from the logged step time) and evaluate it")
    r.add_argument("--restart-seconds", type=float, default=90.0,
                   help="a restarted trainer's time to its first step, for --fit-last-step")
    r.add_argument("--eval-files", type=int, default=None, help="first N validation records only")
    r.add_argument("--eval-batch-size", type=int, default=8)
    r.add_argument("--no-eval", action="store_true",
                   help="train and export only (no `codec-jax eval`, no CSV row): for runs that "
                        "need the trained codec, not its curve, e.g. the entropy figures")
    r.add_argument("--no-visqol", action="store_true")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set train.batch_size=32 (repeatable)")
    q = sub.add_parser("plot", help="CSV -> PNG")
    q.add_argument("csv")
    q.add_argument("--png", default="docs/quality_curve.png")
    q.add_argument("--title", default="")
    args = p.parse_args(argv)
    if args.command == "run":
        return run(args)
    plot_quality_curve(args.csv, args.png, args.title)
    print(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
