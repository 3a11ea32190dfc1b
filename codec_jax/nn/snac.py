"""SNAC codec model: encoder, multi-scale residual quantizer, decoder.

All activations are channels-last. Audio enters as `[batch, samples]` (mono) and is
right-padded to `SNACConfig.pad_multiple` exactly as SNAC's `preprocess` does.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from codec_jax.config import SNACConfig
from codec_jax.nn.layers import DecoderBlock, EncoderBlock, LocalMHA, Snake, WNConv1d
from codec_jax.nn.quantizer import QuantizerConfig, ResidualVQ

Array = jax.Array
Dtype = Any


class Encoder(nn.Module):
    """`[batch, samples, 1]` -> latents `[batch, samples // hop, latent_channels]`."""

    config: SNACConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        d = c.encoder_dim
        x = WNConv1d(d, 7, padding=3, name="conv_in", **kw)(x)
        for i, stride in enumerate(c.encoder_rates):
            d *= 2
            groups = d // 2 if c.depthwise else 1
            x = EncoderBlock(d, stride, groups=groups, name=f"block_{i}", **kw)(x)
        if c.attn_window_size is not None:
            x = LocalMHA(c.attn_window_size, name="attention", **kw)(x)
        return WNConv1d(d, 7, padding=3, groups=d if c.depthwise else 1, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latents `[batch, frames, latent_channels]` -> audio `[batch, frames * hop, 1]` in [-1, 1]."""

    config: SNACConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        latent = x.shape[-1]
        if c.depthwise:
            x = WNConv1d(latent, 7, padding=3, groups=latent, name="conv_in_depthwise", **kw)(x)
            x = WNConv1d(c.decoder_dim, 1, name="conv_in_pointwise", **kw)(x)
        else:
            x = WNConv1d(c.decoder_dim, 7, padding=3, name="conv_in", **kw)(x)
        if c.attn_window_size is not None:
            x = LocalMHA(c.attn_window_size, name="attention", **kw)(x)
        out_dim = c.decoder_dim
        for i, stride in enumerate(c.decoder_rates):
            out_dim = c.decoder_dim // 2 ** (i + 1)
            groups = out_dim if c.depthwise else 1
            x = DecoderBlock(out_dim, stride, noise=c.noise, groups=groups, name=f"block_{i}", **kw)(x)
        x = Snake(self.dtype, self.param_dtype, name="snake_out")(x)
        x = WNConv1d(1, 7, padding=3, name="conv_out", **kw)(x)
        return jnp.tanh(x.astype(jnp.float32))


def pad_audio(audio: Array, config: SNACConfig) -> Array:
    """Right-pad `[batch, samples]` with zeros to a multiple of `config.pad_multiple`."""
    pad = config.padded_length(audio.shape[-1]) - audio.shape[-1]
    return jnp.pad(audio, ((0, 0), (0, pad))) if pad else audio


def check_audio(audio: Array) -> None:
    if audio.ndim != 2:
        raise ValueError(
            f"audio must be [batch, samples] (mono), got shape {tuple(audio.shape)}; "
            "add a batch axis with audio[None] or mix channels down first"
        )
    if audio.shape[-1] == 0:
        raise ValueError("audio has no samples")
    if not jnp.issubdtype(audio.dtype, jnp.floating):
        raise ValueError(f"audio must be floating point in [-1, 1], got dtype {audio.dtype}")


class SNAC(nn.Module):
    """The full codec. Parameters live in the `params` collection; with
    `quantizer.kind == "ema"` the codebooks live in the `"codebook"` collection.

    `dtype` is the compute dtype (float32 or bfloat16); parameters stay in `param_dtype`.
    The quantizer's nearest-code search always runs in float32.
    """

    config: SNACConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    quantizer: QuantizerConfig = QuantizerConfig()

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.encoder = Encoder(c, **kw)
        # The scope keeps SNAC's name `quantizer` (checkpoint layout) while the attribute of
        # that name is the QuantizerConfig.
        self.rvq = ResidualVQ(c.latent_channels, c.codebook_size, c.codebook_dim, c.vq_strides,
                              config=self.quantizer, name="quantizer", **kw)
        self.decoder = Decoder(c, **kw)

    def encode_latents(self, audio: Array) -> Array:
        """audio `[batch, samples]` -> latents `[batch, padded_samples // hop, latent_channels]`."""
        check_audio(audio)
        x = pad_audio(audio, self.config)[..., None]
        return self.encoder(x)

    def __call__(self, audio: Array, *, train: bool = False,
                 n_levels: Optional[int] = None) -> dict[str, Any]:
        """Encode, quantize, decode. audio `[batch, samples]` -> dict with `audio`
        `[batch, samples]` (trimmed to the input length), `latents` and `z_q`
        `[batch, frames, latent_channels]`, and the quantizer's outputs: `codes` (list of
        int32 `[batch, frames_level]`, coarse first), per-level `commitment_loss` /
        `codebook_loss` (lists of `[batch]`), `quantizer_metrics` (`perplexity`, `usage`,
        `dead_codes`, each `[levels]`) and `levels_used` `[batch]`.

        `train=True` applies quantizer dropout and updates ema codebooks (pass
        `rngs={"quantizer": key}` and `mutable=["codebook"]`); `n_levels` limits the levels.
        """
        length = audio.shape[-1]
        z = self.encode_latents(audio)
        q = self.rvq(z, n_levels=n_levels, train=train)
        audio_hat = self.decoder(q["z_q"])[..., 0]
        return dict(q, audio=audio_hat[:, :length], latents=z)

    def encode(self, audio: Array, n_levels: Optional[int] = None) -> list[Array]:
        """audio `[batch, samples]` -> codes: int32 `[batch, frames_level]` per level, coarse first."""
        return self.rvq(self.encode_latents(audio), n_levels=n_levels)["codes"]

    def decode(self, codes: Sequence[Array], length: Optional[int] = None) -> Array:
        """codes (all levels or a coarse-first prefix) -> audio `[batch, samples]`.

        `length` trims SNAC's right padding; noise is sampled only if a `noise` rng is given.
        """
        audio = self.decoder(self.rvq.decode(codes))[..., 0]
        return audio if length is None else audio[:, :length]
