"""Multi-scale residual vector quantizer (SNAC form).

Each level average-pools the residual by its stride (coarse levels run at lower frame
rates), projects it to a low-dimensional space, picks the nearest L2-normalised code,
projects back and repeat-upsamples. Levels act on the residual left by the previous ones.
Latents are `[batch, time, channels]`; codes are int32 `[batch, time // stride]`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from codec_jax.layers import WNConv1d

Array = jax.Array
Dtype = Any


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """`x / max(||x||, eps)`, as `torch.nn.functional.normalize`."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def nearest_code(latents: Array, codebook: Array) -> Array:
    """Index of the nearest L2-normalised code for each latent.

    latents `[..., dim]`, codebook `[codebook_size, dim]` -> int32 `[...]`. The distance is
    written as SNAC writes it (|e|^2 - 2 e.c + |c|^2 on normalised vectors) in float32 at
    full matmul precision, so that near-ties break as the reference breaks them.
    """
    e = l2_normalize(latents.astype(jnp.float32))
    c = l2_normalize(codebook.astype(jnp.float32))
    dist = (
        jnp.sum(jnp.square(e), axis=-1, keepdims=True)
        - 2.0 * jnp.einsum("...d,kd->...k", e, c, precision=jax.lax.Precision.HIGHEST)
        + jnp.sum(jnp.square(c), axis=-1)
    )
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def avg_pool_time(x: Array, stride: int) -> Array:
    """Mean over non-overlapping windows of `stride` frames: `[b, t, c]` -> `[b, t // stride, c]`."""
    if stride == 1:
        return x
    b, t, c = x.shape
    frames = t // stride
    return x[:, : frames * stride].reshape(b, frames, stride, c).mean(axis=2)


class VQLevel(nn.Module):
    """One quantizer level in SNAC's factorized form.

    Parameters: `in_proj` (WN 1x1 conv `dim -> codebook_dim`), `out_proj` (WN 1x1 conv
    `codebook_dim -> dim`), `codebook` `[codebook_size, codebook_dim]`.
    """

    dim: int
    codebook_size: int
    codebook_dim: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.in_proj = WNConv1d(self.codebook_dim, 1, **kw)
        self.out_proj = WNConv1d(self.dim, 1, **kw)
        self.codebook = self.param("codebook", nn.initializers.normal(1.0),
                                   (self.codebook_size, self.codebook_dim), self.param_dtype)

    def __call__(self, z: Array) -> dict[str, Array]:
        """z `[batch, time, dim]` -> dict with `z_q` `[batch, frames*stride, dim]`, `codes`
        `[batch, frames]`, `z_e` `[batch, frames, codebook_dim]`, per-example
        `commitment_loss` and `codebook_loss` `[batch]`."""
        z_pooled = avg_pool_time(z, self.stride)
        z_e = self.in_proj(z_pooled).astype(jnp.float32)
        codes = nearest_code(z_e, self.codebook)
        z_code = jnp.take(self.codebook.astype(jnp.float32), codes, axis=0)
        # DAC's losses on the un-normalised vectors: the codebook moves towards the encoder
        # output, the encoder commits to the codebook.
        commitment = jnp.mean(jnp.square(z_e - jax.lax.stop_gradient(z_code)), axis=(1, 2))
        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z_e) - z_code), axis=(1, 2))
        z_st = z_e + jax.lax.stop_gradient(z_code - z_e)  # straight-through estimator
        z_q = self._upsample(self.out_proj(z_st.astype(self.dtype)))
        return dict(z_q=z_q, codes=codes, z_e=z_e, commitment_loss=commitment,
                    codebook_loss=codebook_loss)

    def decode(self, codes: Array) -> Array:
        """codes `[batch, frames]` -> `[batch, frames*stride, dim]`."""
        z_code = jnp.take(self.codebook, codes, axis=0).astype(self.dtype)
        return self._upsample(self.out_proj(z_code))

    def _upsample(self, x: Array) -> Array:
        return jnp.repeat(x, self.stride, axis=1) if self.stride > 1 else x


class ResidualVQ(nn.Module):
    """Levels applied in turn to the residual the previous ones leave (coarse first)."""

    dim: int
    codebook_size: int
    codebook_dim: int
    strides: Sequence[int]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    def setup(self):
        self.levels = [
            VQLevel(self.dim, self.codebook_size, self.codebook_dim, stride, dtype=self.dtype,
                    param_dtype=self.param_dtype, precision=self.precision, name=f"level_{i}")
            for i, stride in enumerate(self.strides)
        ]

    def __call__(self, z: Array, n_levels: Optional[int] = None) -> dict[str, Any]:
        """z `[batch, time, dim]` -> `z_q` like z, `codes` (list, coarse first), per-level losses.

        `n_levels` uses only the first levels (lower bitrate); the rest contribute nothing.
        """
        n_levels = len(self.strides) if n_levels is None else n_levels
        z_q = jnp.zeros_like(z, dtype=self.dtype)
        residual = z
        codes, commitment, codebook = [], [], []
        for level in self.levels[:n_levels]:
            out = level(residual)
            z_q = z_q + out["z_q"]
            residual = residual - out["z_q"]
            codes.append(out["codes"])
            commitment.append(out["commitment_loss"])
            codebook.append(out["codebook_loss"])
        if self.is_initializing():
            for level in self.levels[n_levels:]:
                level(residual)
        return dict(z_q=z_q, codes=codes, commitment_loss=commitment, codebook_loss=codebook)

    def decode(self, codes: Sequence[Array]) -> Array:
        """codes: list of `[batch, frames_level]`, coarse first (a prefix of the levels is fine)
        -> `[batch, frames_finest*stride_last, dim]`."""
        if not 1 <= len(codes) <= len(self.strides):
            raise ValueError(f"expected 1..{len(self.strides)} code levels, got {len(codes)}")
        z_q = None
        for level, level_codes in zip(self.levels, codes):
            part = level.decode(level_codes)
            z_q = part if z_q is None else z_q + part
        return z_q
