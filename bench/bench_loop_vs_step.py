"""The trainer's own loop against its compiled train step alone, in one process (issue 15
item 2: "the trainer's loop, not only the bench, within 5 % of the bench").

Four views of the same program (same config, same compiled step through the persistent
compilation cache, so it is compiled once):

  1. trainer: `codec_jax.training.loop.train_and_evaluate` on a real TFDS dataset, as
     `codec-jax train` runs it; its step time from `metrics.jsonl` (each logging window,
     the window with the compilation left out by the trainer itself);
  2. step alone, synchronised: one device-resident batch, `block_until_ready` after every
     step (what `bench_cold_start.py --time-steps` times), `--time-steps` steps;
  3. step alone, pipelined: the same batch, as many steps as the trainer ran, dispatched
     back to back with one wait per logging window (what `bench_train.py` times: the
     best any Python loop over this program can do);
  4. bare data loop: the trainer's input iterator and `make_global_batch` feeding the step,
     nothing else (no metric reads, no skip checks), windowed as 3: the input pipeline's
     share of the gap.

    python bench/bench_loop_vs_step.py --source-dir AUDIO_FOLDER --workdir /tmp/lvs \\
        --config snac_24khz --steps 600 --json out.json

The dataset is prepared with `codec-jax prepare-data` into `--data-dir` if it is not there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _prepare(source_dir: str, data_dir: Path, name: str, rate: int) -> None:
    if (data_dir / name).exists():
        return
    cmd = [sys.executable, "-m", "codec_jax", "prepare-data", source_dir, "--name", name,
           "--data-dir", str(data_dir), "--sample-rate", str(rate)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    print(f"prepared {name} in {time.perf_counter() - t0:.1f} s", flush=True)


def _median(values):
    import numpy as np

    return float(np.median(values)) if values else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="snac_24khz")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="as `codec-jax train --config.KEY=VALUE` (repeatable)")
    p.add_argument("--source-dir", required=True, help="audio folder for prepare-data")
    p.add_argument("--workdir", required=True)
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default WORKDIR/tfds)")
    p.add_argument("--dataset", default="loop_bench_speech")
    p.add_argument("--steps", type=int, default=600, help="trainer steps")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--time-steps", type=int, default=100, help="steps per step-alone view")
    p.add_argument("--json", default=None)
    p.add_argument("--trainer-only", action="store_true",
                   help="view 1 only (A/B of trainer variants against one full run)")
    args = p.parse_args(argv)

    import jax

    from bench.bench_cold_start import load_config
    from codec_jax.data import pipeline
    from codec_jax.training import loop
    from codec_jax.training import sharding as shard_lib

    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir).absolute() if args.data_dir else work / "tfds"
    cache_dir = work / "xla_cache"
    config = load_config(args.config, args.override)
    _prepare(args.source_dir, data_dir, args.dataset, int(config.data.sample_rate))
    source = {"kind": "tfds", "name": args.dataset, "data_dir": str(data_dir), "weight": 1.0}
    config.data.sources = [source]
    config.data.eval_sources = [source]
    config.train.num_steps = int(args.steps)
    config.train.compilation_cache_dir = str(cache_dir)
    config.logging.every_steps = int(args.log_every)
    config.logging.eval_every_steps = 0
    config.checkpoint.every_steps = 0  # one save at the end, outside the timed windows

    # ---- 1. the trainer ----
    train_dir = work / "train"
    t0 = time.perf_counter()
    loop.train_and_evaluate(config, str(train_dir))
    trainer_wall = time.perf_counter() - t0
    windows = []
    with open(train_dir / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if "train/perf/step_time_s" in row:
                windows.append((int(row["step"]), float(row["train/perf/step_time_s"])))
    # The last window also holds the final checkpoint's save call; leave it out.
    timed = [t for step, t in windows if step < args.steps]
    trainer = _median(timed)
    result = dict(config=args.config, overrides=args.override,
                  device=jax.devices()[0].device_kind, jax=jax.__version__,
                  xla_flags=os.environ.get("XLA_FLAGS", ""), trainer_wall_s=trainer_wall,
                  trainer_windows=windows, trainer_step_s_median=trainer)
    if args.trainer_only:
        print(f"\n1 trainer loop (metrics.jsonl windows): {trainer * 1e3:.1f} ms/step")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0

    # ---- 2-4. the same program alone (loaded from the cache the trainer filled) ----
    loop.enable_compilation_cache(str(cache_dir))
    setup = loop.create_training_setup(config)
    state = setup.init_state()
    train_iter = pipeline.create_train_iterator(
        config.data, global_batch_size=int(config.train.batch_size), seed=int(config.train.seed))
    batch = shard_lib.make_global_batch(next(train_iter), setup.mesh)
    t_load = time.perf_counter()
    state, metrics = setup.p_train_step(state, batch)
    jax.block_until_ready(metrics)
    first_call = time.perf_counter() - t_load

    synced = []
    for _ in range(args.time_steps):
        t = time.perf_counter()
        state, metrics = setup.p_train_step(state, batch)
        jax.block_until_ready(metrics)
        synced.append(time.perf_counter() - t)

    # Views 3 and 4 run as many steps as the trainer, timed in windows of its logging
    # interval (one wait per window, as its logging has), so that a drift over a run of
    # this length (clocks, power) shows in them too and the medians compare like for like.
    def windowed(next_batch):
        nonlocal state
        times = []
        for _ in range(max(args.steps // args.log_every, 1)):
            t = time.perf_counter()
            for _ in range(args.log_every):
                state, metrics = setup.p_train_step(state, next_batch())
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - t) / args.log_every)
        return times

    pipelined_windows = windowed(lambda: batch)
    data_windows = windowed(lambda: shard_lib.make_global_batch(next(train_iter), setup.mesh))
    pipelined, data_loop = _median(pipelined_windows), _median(data_windows)
    train_iter.close()

    audio_s = int(config.train.batch_size) * setup.num_samples / setup.generator.config.sampling_rate
    result.update(
        batch=int(config.train.batch_size), num_samples=setup.num_samples, audio_s_per_step=audio_s,
        step_first_call_s=first_call, step_synced_s_median=_median(synced),
        step_pipelined_s=pipelined, data_loop_s=data_loop,
        step_pipelined_windows=pipelined_windows, data_loop_windows=data_windows)
    print("\nsame program, same process (median s/step; audio-s/s):")
    for label, value in (("1 trainer loop (metrics.jsonl windows)", trainer),
                         ("2 step alone, synchronised", result["step_synced_s_median"]),
                         ("3 step alone, pipelined (windows)", pipelined),
                         ("4 input pipeline + step (windows)", data_loop)):
        print(f"  {label:40s} {value * 1e3:7.1f} ms  {audio_s / value:7.1f}")
    print(f"  trainer / step alone (synchronised): {trainer / result['step_synced_s_median']:.3f}; "
          f"/ pipelined: {trainer / pipelined:.3f}; cache-loaded first call {first_call:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
