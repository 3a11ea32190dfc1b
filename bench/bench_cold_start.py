"""Cold start of `codec-jax train`: time from the command to the first finished step,
with an empty compilation cache, and where it goes.

Two measurements:

* `--phases` (default): in this process, one phase at a time, each with wall time and
  process CPU time (CPU time is what a shared or loaded host cannot inflate):
  imports, building the models/optimizers/mesh (`create_training_setup`), the state
  init (trace, XLA compile, run), the train step (trace, compile, first run) and the
  eval step (trace, compile). The compilation cache is off.
* `--cli`: runs `codec-jax train` in a subprocess with a fresh workdir and a fresh
  compilation cache directory, and reports when each of its lines appeared; the
  "cold start" is the time until the line that reports the first finished step. With
  `--cli --warm` it then runs the same command again on another fresh workdir with the
  now filled cache (the restart a preempted job sees).

    python bench/bench_cold_start.py --config tiny                    # CPU
    python bench/bench_cold_start.py --config snac_24khz --cli --warm  # one H200

Targets (issue #15): tiny on a 2-core CPU <= 30 s, snac_24khz on one H200 <= 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


class Phases:
    """Records (name, wall s, CPU s) of consecutive phases and prints each as it ends."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        w0, c0 = time.perf_counter(), _cpu_seconds()
        out = fn()
        wall, cpu = time.perf_counter() - w0, _cpu_seconds() - c0
        self.rows.append(dict(phase=name, wall_s=wall, cpu_s=cpu))
        print(f"  {name:<34} wall {wall:7.1f} s   cpu {cpu:7.1f} s", flush=True)
        return out


def measure_phases(config_name: str, overrides: list[str], until: str = "eval",
                   time_steps: int = 0, step_threefry_kernel: bool = False) -> dict[str, Any]:
    """Phases up to `until` ("init", "step" or "eval"); with `time_steps`, also the
    median time of that many train steps after the first (same batch), so that a
    compile-time change can be checked for its cost per step in the same run."""
    phases = Phases()
    t_start = time.perf_counter()

    def imports():
        import jax  # noqa: F401

        from codec_jax.training import loop  # noqa: F401
        return None

    phases.run("import jax + codec_jax.training", imports)
    import jax
    import numpy as np

    from codec_jax.training import loop
    from codec_jax.training import sharding as shard_lib

    jax.config.update("jax_enable_compilation_cache", False)
    config = load_config(config_name, overrides)
    setup = phases.run("create_training_setup", lambda: loop.create_training_setup(config))

    from codec_jax.training import state as ts

    seed_rng = ts.rng_from_seed(int(config.train.seed))
    init = jax.jit(setup.init_fn, in_shardings=(shard_lib.replicated(setup.mesh),),
                   out_shardings=setup.state_shardings)
    with setup.init_lowering():  # as TrainingSetup.init_state compiles it
        lowered = phases.run("state init: trace + lower", lambda: init.lower(seed_rng))
        compiled_init = phases.run(
            "state init: XLA compile",
            lambda: lowered.compile(compiler_options=setup.init_compiler_options() or None))
    state = phases.run("state init: run",
                       lambda: jax.block_until_ready(compiled_init(seed_rng)))
    result = dict(config=config_name, overrides=overrides, phases=phases.rows,
                  device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                  jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
                  threefry_gpu_kernel_init=bool(config.train.get("threefry_gpu_kernel_init", True)),
                  step_threefry_kernel=bool(step_threefry_kernel))
    if until == "init":
        result["to_state_s"] = time.perf_counter() - t_start
        return result

    batch = {"audio": np.zeros((int(config.train.batch_size), setup.num_samples), np.float32)}
    batch = shard_lib.make_global_batch(batch, setup.mesh)
    # The train step as the trainer compiles it (unrolled threefry), or with
    # --step-threefry-kernel the kernel lowering the initialiser uses, for the A/B.
    with loop.threefry_kernel_lowering(step_threefry_kernel):
        lowered = phases.run("train step: trace + lower",
                             lambda: setup.p_train_step.lower(state, batch))
        compiled = phases.run("train step: XLA compile", lowered.compile)
    state, _ = phases.run("train step: first run",
                          lambda: jax.block_until_ready(compiled(state, batch)))
    first_step = time.perf_counter() - t_start
    result["to_first_step_s"] = first_step
    if time_steps:
        times = []
        for _ in range(int(time_steps)):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        result["step_s_median"] = float(np.median(times))
        result["audio_s_per_s"] = (int(config.train.batch_size) * setup.num_samples
                                   / setup.generator.config.sampling_rate / result["step_s_median"])
        print(f"  {time_steps} more steps: median {result['step_s_median'] * 1e3:.1f} ms/step, "
              f"{result['audio_s_per_s']:.1f} audio-s/s", flush=True)
    if until == "step":
        return result

    eval_bs = int(config.logging.eval_batch_size)
    eval_batch = shard_lib.make_global_batch(
        {"audio": np.zeros((eval_bs, setup.num_samples), np.float32)}, setup.mesh)
    # A second state (the first was donated to the train step), from the compiled
    # initialiser: a new jit here would compile it again, outside its threefry lowering.
    state = jax.block_until_ready(compiled_init(seed_rng))
    lowered = phases.run("eval step: trace + lower",
                         lambda: setup.p_eval_step.lower(state, eval_batch))
    phases.run("eval step: XLA compile", lowered.compile)
    return result


def load_config(name: str, overrides: list[str]):
    """The config exactly as `codec-jax train` builds it (its own argument parser): the
    file's get_config(), then the `--config.KEY=VALUE` overrides."""
    from codec_jax.cli.train import parse_args

    config, _, _ = parse_args(["--config", name, "--workdir", "unused"]
                              + [f"--config.{o}" for o in overrides])
    return config


def measure_cli(config_name: str, overrides: list[str], warm: bool) -> dict[str, Any]:
    """Runs `codec-jax train` until it reports its first step, twice with --warm."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="cold_start_") as tmp:
        cache = os.path.join(tmp, "xla_cache")
        for run in (("cold", "warm") if warm else ("cold",)):
            workdir = os.path.join(tmp, f"run_{run}")
            cmd = [sys.executable, "-m", "codec_jax.cli.train", "--config", config_name,
                   "--workdir", workdir, "--config.train.num_steps=1",
                   "--config.logging.every_steps=1", "--config.logging.eval_every_steps=0",
                   f"--config.train.compilation_cache_dir={cache}"]
            cmd += [f"--config.{o}" for o in overrides]
            env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            lines, first_step = [], None
            for line in proc.stdout:
                t = time.perf_counter() - t0
                lines.append((round(t, 2), line.rstrip()))
                print(f"  [{run} {t:6.1f} s] {line.rstrip()}", flush=True)
                if first_step is None and line.startswith("step 1/"):
                    first_step = t
            rc = proc.wait()
            if rc != 0:
                raise SystemExit(f"codec-jax train exited with {rc}")
            results[run] = dict(to_first_step_s=first_step,
                                total_s=time.perf_counter() - t0, lines=lines)
    return dict(config=config_name, overrides=overrides, cli=results)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="a config name or file (as for codec-jax train)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override without the --config. prefix, e.g. train.batch_size=8")
    p.add_argument("--cli", action="store_true", help="time `codec-jax train` in a subprocess")
    p.add_argument("--warm", action="store_true", help="with --cli: a second run on the filled cache")
    p.add_argument("--until", choices=("init", "step", "eval"), default="eval",
                   help="phases: stop after the state init, the first train step, or the eval compile")
    p.add_argument("--time-steps", type=int, default=0,
                   help="phases: then time this many more train steps (median reported)")
    p.add_argument("--step-threefry-kernel", action="store_true",
                   help="phases: compile the train step with threefry lowered to the GPU kernel "
                        "(the trainer compiles only its state initialiser so)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.cli:
        result = measure_cli(args.config, args.override, args.warm)
        for run, r in result["cli"].items():
            print(f"{run} start: first step finished after {r['to_first_step_s']:.1f} s "
                  f"(process exited after {r['total_s']:.1f} s)")
    else:
        print(f"phases of a cold start, config {args.config}:")
        result = measure_phases(args.config, args.override, args.until, args.time_steps,
                                args.step_threefry_kernel)
        if "to_first_step_s" in result:
            step_rows = [r for r in result["phases"] if not r["phase"].startswith("eval")]
            print(f"to the first finished step: {result['to_first_step_s']:.1f} s wall "
                  f"({sum(r['cpu_s'] for r in step_rows):.1f} s CPU)")
        else:
            print(f"to the initialised state: {result['to_state_s']:.1f} s wall")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
