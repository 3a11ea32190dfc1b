"""Where a bfloat16 discriminator departs from the float32 one: forward and gradient.

The slow test `tests/test_step_numerics.py::test_bfloat16_step_agrees_with_float32`
compares one bfloat16 train step with the float32 one. This takes its setup (the tiny
config with 2 x 0.12 s crops, MPD period 2, MRD 256, float32 parameters from seed 0,
the same chord and noisy chirp) and measures, per sub-discriminator, on the *same*
inputs (the float32 generator's reconstruction) and the *same* float32 parameters:

* forward: logits of the bfloat16 module against the float32 one;
* backward: the discriminator loss's gradient (real and fake interleaved as in the
  step), whole sub-discriminator and the worst leaves;
* what the step's `loss/adversarial` sees: the generator's least-squares term against
  the discriminator after one SGD(lr=1) update (the test's optimizer), each dtype
  updated with its own gradient.

    JAX_PLATFORMS=cpu python bench/disc_bf16_precision.py   # ~1.5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax


# The test's own setup (config and audio), so that this measures exactly what it checks.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_step_numerics import audio_batch, small_config  # noqa: E402


def tree_error(a, b) -> tuple[float, float]:
    """(||a - b|| / ||b||, ||b||)."""
    diff = optax.tree.norm(jax.tree_util.tree_map(lambda x, y: x - y, a, b))
    norm = optax.tree.norm(b)
    return float(diff / norm), float(norm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=8, help="worst gradient leaves to print")
    args = parser.parse_args()

    from codec_jax import losses as L
    from codec_jax.training import builders
    from codec_jax.training import loop as trainer
    from codec_jax.training import state as state_lib
    from codec_jax.training import step as step_lib

    ts = trainer.create_training_setup(small_config("float32"))
    n = ts.num_samples
    d32 = ts.discriminator
    d16 = builders.build_discriminator(small_config("bfloat16"))
    names = d32.names()
    audio = audio_batch(n)
    # The test's state (seed 0, float32 parameters whatever the compute dtype).
    state = jax.jit(state_lib.make_init_fn(
        init_generator=lambda k: ts.generator.init(k, n),
        init_discriminator=lambda k: builders.init_discriminator(d32, k, n),
        gen_tx=optax.sgd(1.0), disc_tx=optax.sgd(1.0)))(state_lib.rng_from_seed(0))

    @jax.jit
    def reconstruct(state, audio):
        k = jax.random.fold_in(state_lib.step_key(state.rng, state.step), 1)
        out, _ = ts.generator.apply_train(state.gen_params, state.codebook, audio, k)
        return out["audio"].astype(jnp.float32)

    recon = reconstruct(state, audio)  # the float32 reconstruction: one input for both dtypes
    params = state.disc_params

    def disc_grad(d):
        def loss(p):
            out = d.apply({"params": p}, step_lib._interleave(audio, recon))
            real, fake = step_lib._deinterleave(out)
            return L.discriminator_adversarial_loss(real, fake)
        return jax.jit(jax.value_and_grad(loss))(params)

    def logits(d, p):
        return jax.jit(lambda p: [o[-1].astype(jnp.float32)
                                  for o in d.apply({"params": p}, recon)])(p)

    print(f"backend {jax.default_backend()}, sub-discriminators {names}")
    print("forward, initial parameters, bf16 vs f32 logits:")
    for name, a, b in zip(names, logits(d16, params), logits(d32, params)):
        print(f"  {name}: relative error {float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)):.2e}")

    (l16, g16), (l32, g32) = disc_grad(d16), disc_grad(d32)
    print(f"discriminator loss bf16 {float(l16):.6g} vs f32 {float(l32):.6g}")
    total_err, total = tree_error(g16, g32)
    print(f"discriminator gradient: relative error {total_err:.4f} (norm {total:.4g})")
    for name in names:
        err, norm = tree_error(g16[name], g32[name])
        print(f"  {name}: relative error {err:.4f}, norm {norm:.4g}")
    rows = []
    for path, a in jax.tree_util.tree_leaves_with_path(g16):
        b = g32
        for k in path:
            b = b[k.key]
        rows.append((float(jnp.linalg.norm(a - b)), float(jnp.linalg.norm(b)),
                     jax.tree_util.keystr(path)))
    rows.sort(reverse=True)
    print(f"worst {args.leaves} leaves by absolute error (share of the whole gradient's norm):")
    for err, norm, path in rows[:args.leaves]:
        print(f"  {path}: error {err / total:.2e}, leaf norm {norm / total:.2e}, "
              f"relative to leaf {err / norm:.3f}")

    sgd = lambda g: jax.tree_util.tree_map(lambda p, x: p - x, params, g)  # noqa: E731
    p16, p32 = sgd(g16), sgd(g32)
    terms = lambda ls: [float(jnp.mean((1.0 - f) ** 2)) for f in ls]  # noqa: E731
    t16, t16_fwd, t32 = terms(logits(d16, p16)), terms(logits(d16, p32)), terms(logits(d32, p32))
    print("generator adversarial term after one SGD(lr=1) discriminator update:")
    for name, a, af, b in zip(names, t16, t16_fwd, t32):
        print(f"  {name}: bf16 {a:.5g} vs f32 {b:.5g} ({(a - b) / b:+.2%}); "
              f"bf16 forward at the f32 update {af:.5g} ({(af - b) / b:+.2%})")
    a, b = sum(t16), sum(t32)
    print(f"  total: bf16 {a:.5g} vs f32 {b:.5g} ({(a - b) / b:+.2%})")


if __name__ == "__main__":
    main()
