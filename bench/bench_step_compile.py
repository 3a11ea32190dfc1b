"""Compile time of the GAN train step, with and without the check of the new state.

The step drops any update that would leave a NaN/inf in the new parameters, optimizer
states, EMA codebooks or balancer state: it checks the updates' global norms
(`codec_jax.training.step._updates_finite`) and the small codebook/balancer trees. A
first version counted non-finite values leaf by leaf over the whole new state (~1000
leaves for the tiny config): the step's CPU compile went from 64 s to over 9 minutes.
This measures what the check as shipped costs at compile time:

    JAX_PLATFORMS=cpu python bench/bench_step_compile.py --config tiny
    python bench/bench_step_compile.py --config snac_24khz   # on the target accelerator

It prints lowering and compilation seconds for the step as shipped ("checked") and for
the step with the new-state check replaced by a constant ("losses only", the guard
before issue 12). No persistent compilation cache is used.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp


def measure(config_name: str, check_new_state: bool) -> tuple[float, float]:
    from codec_jax.cli.train import load_config
    from codec_jax.training import loop
    from codec_jax.training import step as step_lib

    original = step_lib._updates_finite, step_lib._all_finite
    if not check_new_state:
        def losses_only(*trees):
            leaves = jax.tree_util.tree_leaves(trees)
            # The loss/grad-norm check passes 4 scalars; the new-state check passes trees.
            return original[1](*trees) if len(leaves) <= 8 else jnp.bool_(True)
        step_lib._updates_finite = lambda *updates: jnp.bool_(True)
        step_lib._all_finite = losses_only
    try:
        config = load_config(config_name)
        setup = loop.create_training_setup(config)
        batch_sharding = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
        batch = {"audio": jax.ShapeDtypeStruct((int(config.train.batch_size), setup.num_samples),
                                               jnp.float32, sharding=batch_sharding)}
        t0 = time.perf_counter()
        lowered = setup.p_train_step.lower(setup.restore_target(), batch)
        t1 = time.perf_counter()
        lowered.compile()
        return t1 - t0, time.perf_counter() - t1
    finally:
        step_lib._updates_finite, step_lib._all_finite = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    args = parser.parse_args()
    for label, check in (("losses only", False), ("checked", True)):
        lower_s, compile_s = measure(args.config, check)
        print(f"{args.config} {label:12s} lower {lower_s:6.1f} s  compile {compile_s:6.1f} s",
              flush=True)


if __name__ == "__main__":
    main()
