"""Compress real photographs with a 2-D multi-scale residual VQ (no audio involved).

Data: the colour sample images shipped inside scikit-image (`skimage.data`: astronaut,
coffee, chelsea, rocket, immunohistochemistry, ...; no download), cut into 32x32 patches.
One image (`--test-image`, default `coffee`) is held out: every figure reported on it is
out of sample.

Model: a small convolutional encoder (two stride-2 convolutions: 32x32x3 -> 8x8x`dim`), a
`ResidualVQ` on the `[batch, 8, 8, dim]` latent with per-axis strides ((4, 4), (2, 2),
(1, 1)) -- the first level one code per 16x16-pixel block (shapes), the second per 8x8, the
last per 4x4 (texture) -- with EMA codebooks of 64, 128 and 256 codes, and a mirror-image
decoder of transposed convolutions. Quantizer dropout on every example
(`dropout_prob=1.0`) trains every prefix of levels to decode, so one model gives three
bitrates. The script prints PSNR against bits per pixel for 1..3 levels on the held-out
image and writes a picture of its reconstructions at each bitrate (`--figure`).

Run: `python examples/image_rvq.py --figure docs/image_rvq.png` (1500 steps, a few minutes
on 2 CPU cores) or with `--steps 100` for a smoke run.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from codec_jax.nn.quantizer import CODEBOOK_COLLECTION, QuantizerConfig, ResidualVQ

IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
          "retina", "coins", "camera")
PATCH = 32
STRIDES = ((4, 4), (2, 2), (1, 1))
CODEBOOKS = (64, 128, 256)


def load_image(name: str) -> np.ndarray:
    """-> float32 `[height, width, 3]` in [0, 1] (grey images are repeated to 3 channels)."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)(), np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., :3]
    return img / 255.0 if img.max() > 1.5 else img


def patches(img: np.ndarray, stride: int = PATCH) -> np.ndarray:
    """Non-overlapping (by default) 32x32 patches `[n, 32, 32, 3]`."""
    h, w, _ = img.shape
    return np.stack([img[i:i + PATCH, j:j + PATCH] for i in range(0, h - PATCH + 1, stride)
                     for j in range(0, w - PATCH + 1, stride)])


class ImageCodec(nn.Module):
    """32x32x3 patches -> 8x8 latents -> multi-scale RVQ -> 32x32x3 reconstructions."""

    dim: int = 16
    width: int = 32
    quantizer: QuantizerConfig = QuantizerConfig(kind="ema", use_projection=False, dropout_prob=1.0,
                                                 dead_code_threshold=1.0, codebook_sizes=CODEBOOKS)

    def setup(self):
        self.encoder = [nn.Conv(self.width, (4, 4), (2, 2)), nn.Conv(self.width, (4, 4), (2, 2)),
                        nn.Conv(self.dim, (3, 3))]
        self.rvq = ResidualVQ(self.dim, CODEBOOKS[-1], self.dim, STRIDES, config=self.quantizer)
        self.decoder = [nn.Conv(self.width, (3, 3)), nn.ConvTranspose(self.width, (4, 4), (2, 2)),
                        nn.ConvTranspose(self.width, (4, 4), (2, 2)), nn.Conv(3, (3, 3))]

    def __call__(self, x, *, train: bool = False, n_levels: Optional[int] = None):
        z = x - 0.5
        for i, layer in enumerate(self.encoder):
            z = layer(z) if i == len(self.encoder) - 1 else nn.gelu(layer(z))
        q = self.rvq(z, n_levels=n_levels, train=train)
        y = q["z_q"]
        for i, layer in enumerate(self.decoder):
            y = layer(y) if i == len(self.decoder) - 1 else nn.gelu(layer(y))
        return y + 0.5, q


def bits_per_pixel(n_levels: int) -> float:
    """log2(codebook) bits for each code, over the 32x32 pixels of a patch."""
    codes = [(8 // s[0]) * (8 // s[1]) for s in STRIDES]
    return sum(c * math.log2(k) for c, k in zip(codes[:n_levels], CODEBOOKS[:n_levels])) / PATCH ** 2


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.clip(x, 0, 1) - y) ** 2)))


def train(model: ImageCodec, data: np.ndarray, *, steps: int, batch: int = 32, seed: int = 0,
          lr: float = 2e-3) -> dict[str, Any]:
    key = jax.random.key(seed)
    variables = model.init(key, jnp.asarray(data[:batch]))
    params, codebook = variables["params"], variables[CODEBOOK_COLLECTION]
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, codebook, opt_state, x, key):
        def loss_fn(params):
            (y, q), new = model.apply({"params": params, CODEBOOK_COLLECTION: codebook}, x, train=True,
                                      rngs={"quantizer": key}, mutable=[CODEBOOK_COLLECTION])
            commit = sum(jnp.mean(c) for c in q["commitment_loss"])
            return jnp.mean(jnp.square(y - x)) + 0.25 * commit, new[CODEBOOK_COLLECTION]

        (loss, codebook), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), codebook, opt_state, loss

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i in range(steps):
        x = data[rng.integers(0, len(data), batch)]
        x = np.where(rng.random((batch, 1, 1, 1)) < 0.5, x, x[:, :, ::-1])  # horizontal flips
        params, codebook, opt_state, loss = step(params, codebook, opt_state, jnp.asarray(x),
                                                 jax.random.fold_in(key, i))
        if (i + 1) % max(steps // 5, 1) == 0:
            print(f"  step {i + 1}/{steps}  loss {float(loss):.5f}  ({time.perf_counter() - t0:.0f} s)")
    return {"params": params, CODEBOOK_COLLECTION: codebook}


def reconstruct(model: ImageCodec, variables, img: np.ndarray, n_levels: int) -> np.ndarray:
    """Code the whole image patch by patch (its size cropped to a multiple of 32)."""
    h, w = img.shape[0] // PATCH * PATCH, img.shape[1] // PATCH * PATCH
    p = patches(img[:h, :w])
    y, _ = jax.jit(lambda v, x: model.apply(v, x, n_levels=n_levels))(variables, jnp.asarray(p))
    y = np.clip(np.asarray(y), 0, 1).reshape(h // PATCH, w // PATCH, PATCH, PATCH, 3)
    return y.transpose(0, 2, 1, 3, 4).reshape(h, w, 3)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--test-image", default="coffee", choices=IMAGES)
    parser.add_argument("--figure", default=None, help="write the reconstructions to this PNG")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train_patches = np.concatenate([patches(load_image(n)) for n in IMAGES if n != args.test_image])
    test_img = load_image(args.test_image)
    print(f"{len(train_patches)} training patches from {len(IMAGES) - 1} images; held out: {args.test_image}")
    model = ImageCodec()
    variables = train(model, train_patches, steps=args.steps, seed=args.seed)

    h, w = test_img.shape[0] // PATCH * PATCH, test_img.shape[1] // PATCH * PATCH
    target = test_img[:h, :w]
    rows, images = [], []
    print("levels  bits/pixel  PSNR (dB, held-out image)")
    for n in range(1, len(STRIDES) + 1):
        recon = reconstruct(model, variables, test_img, n)
        rows.append({"levels": n, "bpp": bits_per_pixel(n), "psnr": psnr(recon, target)})
        images.append(recon)
        print(f"{n:>6}  {rows[-1]['bpp']:>10.4f}  {rows[-1]['psnr']:>6.2f}")
    mean_psnr = psnr(np.broadcast_to(target.mean(axis=(0, 1)), target.shape), target)
    print(f"  (0 bits, the image's mean colour: {mean_psnr:.2f} dB)")
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(images) + 1, figsize=(4 * (len(images) + 1), 3.4))
        axes[0].imshow(target)
        axes[0].set_title(f"original ({args.test_image}, held out)")
        for ax, img, row in zip(axes[1:], images, rows):
            ax.imshow(img)
            ax.set_title(f"{row['levels']} level(s): {row['bpp']:.3f} bpp, {row['psnr']:.1f} dB")
        for ax in axes:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(args.figure, dpi=90)
        print(f"wrote {args.figure}")
    return {"test": rows, "zero_bit_psnr": mean_psnr}


if __name__ == "__main__":
    main()
