"""What the train step's XLA compile time depends on (issue 15 item 1, the CPU cold start):
the tiny config's step compiled with parts of it replaced, one variant per process.

Variants (a diagnosis, not training code; the replaced parts change the step's results):

* `base`: the step as it is;
* `nofinite`: the skip check's norms of the updates replaced by True;
* `nofinite_nonorm`: that, and every `optax.tree.norm` (clipping, the logged gradient
  norms) replaced by 1: about 1600 fewer fusions;
* `steprbg`: the step's PRNG key (`state.step_key`) as an `unsafe_rbg` key (XLA's
  RngBitGenerator) instead of threefry.

Also `--trace DIR`: a JAX profiler trace of the compile (XLA's passes, the fusion
emitters, LLVM code generation), and the count of fusions and of distinct fused
computations in the optimised HLO.

    JAX_PLATFORMS=cpu python bench/probe_step_compile.py base nofinite nofinite_nonorm
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("base", "nofinite", "nofinite_nonorm", "steprbg")


def distinct_fusions(hlo: str) -> int:
    """Fused computations that differ once instruction names and metadata are dropped
    (XLA's CPU backend compiles each distinct one once)."""
    bodies = set()
    for block in re.split(r"\n(?=%)", hlo):
        head = block.split("\n", 1)[0]
        if head.startswith("%fused") and "\n" in block:
            body = re.sub(r", metadata=\{[^}]*\}", "", block.split("\n", 1)[1])
            bodies.add(re.sub(r"%[\w.\-]+", "%x", body))
    return len(bodies)


def measure(variant: str, trace_dir: str | None) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from codec_jax.training import step as step_lib

    if variant.startswith("nofinite"):
        step_lib._updates_finite = lambda *updates: jnp.bool_(True)
    if variant == "nofinite_nonorm":
        optax.tree.norm = lambda tree: jnp.float32(1.0)
    if variant == "steprbg":
        def rbg_step_key(state_rng, step):
            data = jnp.concatenate([state_rng, state_rng + step.astype(jnp.uint32)])
            return jax.random.wrap_key_data(data, impl="unsafe_rbg")
        step_lib.step_key = rbg_step_key
    from codec_jax.training import loop
    from codec_jax.training import sharding as shard_lib

    config = importlib.import_module("codec_jax.configs.tiny").get_config()
    setup = loop.create_training_setup(config)
    state = setup.init_state()
    batch = shard_lib.make_global_batch(
        {"audio": np.zeros((int(config.train.batch_size), setup.num_samples), np.float32)},
        setup.mesh)
    t0 = time.perf_counter()
    lowered = setup.p_train_step.lower(state, batch)
    t1 = time.perf_counter()
    if trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            compiled = lowered.compile()
    else:
        compiled = lowered.compile()
    t2 = time.perf_counter()
    hlo = compiled.as_text()
    print(f"{variant}: trace + lower {t1 - t0:.1f} s, XLA compile {t2 - t1:.1f} s, "
          f"{hlo.count(' fusion(')} fusions, {distinct_fusions(hlo)} distinct", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="*", default=["base"], choices=VARIANTS)
    p.add_argument("--trace", default=None, help="profile the compile into this folder")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        measure(args.variants[0], args.trace)
        return 0
    for variant in args.variants:  # a fresh process each: no shared compile caches
        cmd = [sys.executable, __file__, "--child", variant]
        if args.trace:
            cmd += ["--trace", f"{args.trace}/{variant}"]
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
