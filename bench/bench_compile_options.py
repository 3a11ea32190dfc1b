"""Compile time against run time of the trainer's two programs (state initialiser, train
step) under XLA compile options (issue 15 item 1: the CPU cold start): backend (LLVM)
optimisation levels, or any option set.

    JAX_PLATFORMS=cpu python bench/bench_compile_options.py --config tiny --rounds 2
    JAX_PLATFORMS=cpu python bench/bench_compile_options.py --config tiny --programs step \
        --variants default xla_llvm_disable_expensive_passes=true

A variant is `default` (no options), an integer (that `xla_backend_optimization_level`)
or `KEY=VALUE[,KEY=VALUE]`. Every (round, variant) runs in a fresh process, the variants
in alternating order over rounds so that a machine's drift does not favour one: a process
caches a compile by its options, and its first compile pays one-off costs. The persistent
cache is off. Only the measured program gets the options; with `--programs step` the
initialiser keeps XLA's default. The train step's speed is the median of `--steps`
synchronised steps on one zero batch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.xla_options import parse_options  # noqa: E402


def variant_options(variant: str) -> dict:
    """The XLA compile options a variant names (see the module docstring)."""
    if variant == "default":
        return {}
    if variant.lstrip("-").isdigit():
        return {"xla_backend_optimization_level": int(variant)}
    return parse_options(variant)


def measure(config_name: str, programs: list[str], variant: str, steps: int) -> list[dict]:
    import jax
    import numpy as np

    from bench.bench_cold_start import load_config
    from codec_jax.training import loop
    from codec_jax.training import sharding as shard_lib
    from codec_jax.training import state as ts

    jax.config.update("jax_enable_compilation_cache", False)
    config = load_config(config_name, [])
    setup = loop.create_training_setup(config)
    seed_rng = ts.rng_from_seed(int(config.train.seed))
    init = jax.jit(setup.init_fn, in_shardings=(shard_lib.replicated(setup.mesh),),
                   out_shardings=setup.state_shardings)
    options = variant_options(variant)
    rows = []
    with setup.init_lowering():
        init_lowered = init.lower(seed_rng)
    t0 = time.perf_counter()
    compiled = init_lowered.compile(compiler_options=(options or None) if "init" in programs else None)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = jax.block_until_ready(compiled(seed_rng))
    if "init" in programs:
        rows.append(dict(program="init", variant=variant, compile_s=compile_s,
                         run_s=time.perf_counter() - t0))
    if "step" in programs:
        batch = shard_lib.make_global_batch(
            {"audio": np.zeros((int(config.train.batch_size), setup.num_samples), np.float32)},
            setup.mesh)
        step_lowered = setup.p_train_step.lower(state, batch)
        t0 = time.perf_counter()
        compiled = step_lowered.compile(compiler_options=options or None)
        compile_s = time.perf_counter() - t0
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        rows.append(dict(program="step", variant=variant, compile_s=compile_s,
                         step_s_median=float(np.median(times))))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--levels", default="3,2,0", help="xla_backend_optimization_level values")
    p.add_argument("--variants", nargs="+", default=None,
                   help="option sets instead of --levels: default, N or KEY=VALUE[,KEY=VALUE]")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--programs", default="init,step")
    p.add_argument("--json", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    programs = args.programs.split(",")
    if args.one is not None:
        print("ROWS " + json.dumps(measure(args.config, programs, args.one, args.steps)), flush=True)
        return 0

    import numpy as np

    variants = args.variants or args.levels.split(",")
    for variant in variants:
        variant_options(variant)  # a malformed variant stops here, not in round 2
    rows = []
    for round_index in range(args.rounds):
        for variant in (variants if round_index % 2 == 0 else variants[::-1]):
            cmd = [sys.executable, __file__, "--config", args.config, "--programs",
                   ",".join(programs), "--steps", str(args.steps), "--one", variant]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or "ROWS " not in proc.stdout:
                # An option XLA rejects (or a crash): say so in one line and go on.
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"variant {variant}: failed (rc {proc.returncode}): {last[:300]}", flush=True)
                continue
            for row in json.loads(proc.stdout.split("ROWS ", 1)[1]):
                row["round"] = round_index
                rows.append(row)
                print(row, flush=True)
    print("\nmedians over rounds:")
    for program in programs:
        for variant in variants:
            sel = [r for r in rows if r["program"] == program and r["variant"] == variant]
            if not sel:
                continue
            c = float(np.median([r["compile_s"] for r in sel]))
            extra = (f", step {np.median([r['step_s_median'] for r in sel]) * 1e3:.1f} ms"
                     if program == "step" else "")
            print(f"  {program:5s} {variant}: compile {c:.1f} s{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(config=args.config, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
