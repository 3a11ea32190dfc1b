"""Compress a real multivariate time series with a multi-scale residual VQ (no audio involved).

Data: `statsmodels.datasets.macrodata`, 203 quarters (1959Q1-2009Q3) of 12 US macroeconomic
series, shipped inside statsmodels (no download). The eight level series (GDP, consumption,
investment, government spending, disposable income, CPI, M1, population) become quarterly
log growth rates in percent; the four rates (T-bill rate, unemployment, inflation, real
interest rate) are kept as they are. The 202 quarters are cut into 8-quarter blocks and
every 5th block is held out (5 blocks, 40 quarters); the other 160 quarters form five
contiguous 32-quarter training segments. Every column is standardised with the training
statistics, so the zero-bit reconstruction (the training mean) has mse ~1.

Model: a per-quarter MLP encoder (1x1 convolutions: temporal structure is left to the
quantizer's strides, and wider kernels overfit these 160 quarters) maps the 12 values to a
16-dim latent; a `ResidualVQ` with strides (4, 2, 1, 1) quantizes it (the first level one
code per year, the second per half-year, the last two per quarter) with EMA codebooks of 16,
32, 64 and 64 codes; a mirror-image decoder reconstructs the 12 series. Training uses
quantizer dropout on every example (`dropout_prob=1.0`), so any prefix of levels decodes.
The script prints reconstruction mse (in training standard deviations squared) against bits
per quarter for 1..4 levels, in sample and on the held-out blocks.

Run: `python examples/timeseries_rvq.py` (600 steps, about a minute on 2 CPU cores) or with
`--steps 120` for a smoke run. `--kind factorized` (SNAC's form) or `--projection` (EMA
codebooks in a 4-dim projection) switch the codebook form; the default quantizes the latent
directly. `--kernel 5` gives the encoder/decoder temporal context.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from codec_jax.nn.quantizer import CODEBOOK_COLLECTION, QuantizerConfig, ResidualVQ, bits_per_frame

GROWTH = ["realgdp", "realcons", "realinv", "realgovt", "realdpi", "cpi", "m1", "pop"]
RATES = ["tbilrate", "unemp", "infl", "realint"]
BLOCK = 8  # quarters per block; every 5th block is held out (interleaved block split)


def load_macrodata() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """-> (train `[5, 32, 12]`: five contiguous 8-year segments, test `[5, 8, 12]`: the
    two-year block after each segment, column names), standardised on the training span.

    Interleaved blocks rather than "the last decade" keep train and test from the same
    regime, so the held-out error measures the codec rather than a structural break.
    """
    from statsmodels.datasets import macrodata

    df = macrodata.load_pandas().data
    growth = 100.0 * np.diff(np.log(df[GROWTH].to_numpy(np.float64)), axis=0)
    rates = df[RATES].to_numpy(np.float64)[1:]
    data = np.concatenate([growth, rates], axis=1)  # [202, 12]: 1959Q2..2009Q3
    blocks = data[: len(data) // BLOCK * BLOCK].reshape(-1, 5, BLOCK, data.shape[1])
    train = blocks[:, :4].reshape(blocks.shape[0], 4 * BLOCK, -1)  # [5, 32, 12]
    test = blocks[:, 4]  # [5, 8, 12]
    mean, std = train.mean((0, 1)), train.std((0, 1))
    return (((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32),
            GROWTH + RATES)


class SeriesCodec(nn.Module):
    """`[batch, time, channels]` -> (reconstruction like the input, quantizer outputs).

    Encoder and decoder are 3-layer convolution stacks (kernel `kernel`, GELU); `time` must
    be a multiple of the strides' lcm (4)."""

    channels: int
    latent: int = 16
    hidden: int = 64
    kernel: int = 1
    strides: Sequence[int] = (4, 2, 1, 1)
    codebook_sizes: Sequence[int] = (16, 32, 64, 64)
    codebook_dim: int = 4
    quantizer: QuantizerConfig = QuantizerConfig(kind="ema", use_projection=False)

    def setup(self):
        conv = lambda f, k, name: nn.Conv(f, (k,), padding="SAME", name=name)
        k = self.kernel
        self.enc = [conv(self.hidden, k, "enc_0"), conv(self.hidden, k, "enc_1"),
                    conv(self.latent, 1, "enc_out")]
        self.dec = [conv(self.hidden, k, "dec_0"), conv(self.hidden, k, "dec_1"),
                    conv(self.channels, 1, "dec_out")]
        quantizer = dataclasses.replace(self.quantizer, codebook_sizes=tuple(self.codebook_sizes))
        self.rvq = ResidualVQ(self.latent, max(self.codebook_sizes), self.codebook_dim,
                              tuple(self.strides), config=quantizer)

    @staticmethod
    def _stack(layers, x):
        for layer in layers[:-1]:
            x = nn.gelu(layer(x))
        return layers[-1](x)

    def __call__(self, x, *, train: bool = False, n_levels: Optional[int] = None):
        q = self.rvq(self._stack(self.enc, x), n_levels, train=train)
        return self._stack(self.dec, q["z_q"]), q


def random_windows(key, segments: jax.Array, batch: int, length: int) -> jax.Array:
    """`batch` random windows `[batch, length, channels]` of `segments` `[n, time, channels]`."""
    k_seg, k_start = jax.random.split(key)
    seg = jax.random.randint(k_seg, (batch,), 0, segments.shape[0])
    starts = jax.random.randint(k_start, (batch,), 0, segments.shape[1] - length + 1)
    return jax.vmap(lambda i, s: jax.lax.dynamic_slice_in_dim(segments[i], s, length, axis=0))(
        seg, starts)


def train(model: SeriesCodec, data: np.ndarray, *, steps: int, batch: int = 32,
          window: int = 16, lr: float = 2e-3, seed: int = 0, log_every: int = 0
          ) -> dict[str, Any]:
    """Adam on MSE + 0.25 * commitment (+ codebook loss for the factorized kind).
    Returns the variables `{"params", "codebook"}`."""
    series = jnp.asarray(data)
    key = jax.random.key(seed)
    variables = model.init(key, series[:1, :window])
    params, codebook = variables["params"], variables.get(CODEBOOK_COLLECTION, {})
    schedule = optax.cosine_decay_schedule(lr, steps, alpha=0.05)
    opt = optax.adam(schedule)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, codebook, opt_state, key):
        k_data, k_q = jax.random.split(key)
        x = random_windows(k_data, series, batch, window)

        def loss_fn(params):
            (x_hat, q), new = model.apply({"params": params, CODEBOOK_COLLECTION: codebook}, x,
                                          train=True, rngs={"quantizer": k_q},
                                          mutable=[CODEBOOK_COLLECTION])
            mse = jnp.mean(jnp.square(x_hat - x))
            # Per-level losses are zero for the examples that dropout cut short.
            vq = sum(0.25 * jnp.mean(c) + jnp.mean(b)
                     for c, b in zip(q["commitment_loss"], q["codebook_loss"]))
            return mse + vq, (mse, q["quantizer_metrics"], new.get(CODEBOOK_COLLECTION, {}))

        (_, (mse, health, codebook)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), codebook, opt_state, mse, health

    for i in range(steps):
        params, codebook, opt_state, mse, health = step(params, codebook, opt_state,
                                                        jax.random.fold_in(key, i))
        if log_every and (i % log_every == 0 or i == steps - 1):
            print(f"step {i:5d}  train mse (random levels) {float(mse):.4f}  perplexity "
                  f"{np.round(np.asarray(health['perplexity']), 1)}  dead "
                  f"{np.asarray(health['dead_codes'])}")
    return {"params": params, CODEBOOK_COLLECTION: codebook}


def evaluate(model: SeriesCodec, variables, series: np.ndarray) -> list[dict[str, float]]:
    """Reconstruction of sequences `[n, time, channels]` (time a multiple of the strides'
    lcm) with 1..N levels -> rows with `levels`, `bits_per_quarter`, `bits_per_value` and
    `mse` (standardised units, so the zero-bit reconstruction, the training mean, scores
    `mean(series**2)`)."""
    x = jnp.asarray(series)
    rows = []
    for n in range(1, len(model.strides) + 1):
        x_hat, _ = model.apply(variables, x, n_levels=n)
        bits = bits_per_frame(model.strides, model.codebook_sizes, n)
        rows.append(dict(levels=n, bits_per_quarter=bits, bits_per_value=bits / series.shape[-1],
                         mse=float(jnp.mean(jnp.square(x_hat - x)))))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--kind", choices=("ema", "factorized"), default="ema")
    parser.add_argument("--projection", action="store_true",
                        help="ema only: quantize in a 4-dim projection, as SNAC does")
    parser.add_argument("--kernel", type=int, default=1,
                        help="temporal kernel of the encoder/decoder convolutions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    projection = args.kind == "factorized" or args.projection
    quantizer = QuantizerConfig(kind=args.kind, use_projection=projection, dropout_prob=1.0)
    train_data, test_data, names = load_macrodata()
    model = SeriesCodec(channels=train_data.shape[-1], kernel=args.kernel, quantizer=quantizer)
    print(f"macrodata: {len(names)} series; {train_data.shape[0] * train_data.shape[1]} training "
          f"quarters, {test_data.shape[0] * test_data.shape[1]} held out (every 5th {BLOCK}-quarter "
          f"block); quantizer {args.kind}, projection={projection}, strides {model.strides}, "
          f"codebooks {model.codebook_sizes}")
    start = time.time()
    variables = train(model, train_data, steps=args.steps, seed=args.seed,
                      log_every=max(args.steps // 5, 1))
    print(f"trained {args.steps} steps in {time.time() - start:.1f} s")
    results = {"train": evaluate(model, variables, train_data),
               "test": evaluate(model, variables, test_data),
               "zero_bit_mse": {"train": float(np.mean(np.square(train_data))),
                                "test": float(np.mean(np.square(test_data)))}}
    print(f"\nzero bits (training mean): mse train {results['zero_bit_mse']['train']:.3f}, "
          f"held-out {results['zero_bit_mse']['test']:.3f}; raw float32 is {32 * len(names)} "
          "bits per quarter")
    print("levels  bits/quarter  bits/value  train mse  held-out mse")
    for tr, te in zip(results["train"], results["test"]):
        print(f"{te['levels']:6d}  {te['bits_per_quarter']:12.2f}  {te['bits_per_value']:10.3f}"
              f"  {tr['mse']:9.3f}  {te['mse']:12.3f}")
    return results


if __name__ == "__main__":
    main()
