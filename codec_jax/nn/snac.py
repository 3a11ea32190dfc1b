"""SNAC codec model: encoder, multi-scale residual quantizer, decoder.

All activations are channels-last. Audio enters as `[batch, samples]` (mono, SNAC's
case) or `[batch, samples, channels]` for a model with `config.audio_channels > 1`
(channels coded jointly: the first conv reads them all, the last writes them all), and is
right-padded to `SNACConfig.pad_multiple` exactly as SNAC's `preprocess` does.

Rows of different lengths in one zero-padded batch: given each row's valid samples, the
encoder and decoder zero every activation beyond the row's (padded) end, at each layer's
time resolution, before each layer that mixes time steps. A row then sees what it would
see coded alone (its own zero padding), so its codes and audio do not depend on the batch.
Without lengths no mask is built and the graph is unchanged.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from codec_jax.config import SNACConfig
from codec_jax.nn.layers import DecoderBlock, EncoderBlock, LocalMHA, Snake, WNConv1d, apply_mask
from codec_jax.nn.quantizer import QuantizerConfig, ResidualVQ

Array = jax.Array
Dtype = Any


class Encoder(nn.Module):
    """`[batch, samples, audio_channels]` -> latents `[batch, samples // hop, latent_channels]`."""

    config: SNACConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array, valid: Optional[Array] = None) -> Array:
        """`valid` int `[batch]`: each row's padded length in samples (a multiple of
        `config.pad_multiple`; its samples beyond the real clip must be zero), or None."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        d = c.encoder_dim
        x = WNConv1d(d, 7, padding=3, name="conv_in", **kw)(x)
        for i, stride in enumerate(c.encoder_rates):
            d *= 2
            groups = d // 2 if c.depthwise else 1
            x = EncoderBlock(d, stride, groups=groups, name=f"block_{i}", **kw)(x, valid)
            valid = None if valid is None else valid // stride
        if c.attn_window_size is not None:
            # Windows never straddle a row's end (valid frames are a multiple of the window).
            x = LocalMHA(c.attn_window_size, name="attention", **kw)(x)
        return WNConv1d(d, 7, padding=3, groups=d if c.depthwise else 1, name="conv_out",
                        **kw)(apply_mask(x, valid))


class Decoder(nn.Module):
    """Latents `[batch, frames, latent_channels]` -> audio `[batch, frames * hop, audio_channels]` in [-1, 1]."""

    config: SNACConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array, valid: Optional[Array] = None,
                 frame_offsets: Optional[Array] = None) -> Array:
        """`valid` int `[batch]`: each row's latent frames (None: all); `frame_offsets` int
        `[batch]`: absolute latent frame of each row's first frame, which places the noise
        (see `NoiseBlock`; None: independent noise per row)."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        latent = x.shape[-1]
        x = apply_mask(x, valid)
        if c.depthwise:
            x = WNConv1d(latent, 7, padding=3, groups=latent, name="conv_in_depthwise", **kw)(x)
            x = WNConv1d(c.decoder_dim, 1, name="conv_in_pointwise", **kw)(x)
        else:
            x = WNConv1d(c.decoder_dim, 7, padding=3, name="conv_in", **kw)(x)
        if c.attn_window_size is not None:
            x = LocalMHA(c.attn_window_size, name="attention", **kw)(x)
        out_dim = c.decoder_dim
        steps_per_frame = 1
        for i, stride in enumerate(c.decoder_rates):
            out_dim = c.decoder_dim // 2 ** (i + 1)
            groups = out_dim if c.depthwise else 1
            steps_per_frame *= stride
            x = DecoderBlock(out_dim, stride, noise=c.noise, groups=groups,
                             steps_per_frame=steps_per_frame, name=f"block_{i}",
                             **kw)(x, valid, frame_offsets)
            valid = None if valid is None else valid * stride
        x = Snake(self.dtype, self.param_dtype, name="snake_out")(apply_mask(x, valid))
        x = WNConv1d(c.audio_channels, 7, padding=3, name="conv_out", **kw)(x)
        return jnp.tanh(x.astype(jnp.float32))


def pad_audio(audio: Array, config: SNACConfig) -> Array:
    """Right-pad `[batch, samples(, channels)]` with zeros to a multiple of `config.pad_multiple`."""
    pad = config.padded_length(audio.shape[1]) - audio.shape[1]
    widths = ((0, 0), (0, pad)) + ((0, 0),) * (audio.ndim - 2)
    return jnp.pad(audio, widths) if pad else audio


def audio_layout(channels: int) -> str:
    return "[batch, samples]" if channels == 1 else f"[batch, samples, {channels}]"


def check_audio(audio: Array, channels: int = 1) -> None:
    """`[batch, samples]` for a mono model, `[batch, samples, channels]` otherwise."""
    ok = audio.ndim == 2 if channels == 1 else (audio.ndim == 3 and audio.shape[-1] == channels)
    if not ok:
        hint = ("add a batch axis with audio[None] or mix channels down first" if channels == 1
                else "add a batch axis with audio[None]; channels go last")
        raise ValueError(
            f"audio must be {audio_layout(channels)} for this {channels}-channel model, "
            f"got shape {tuple(audio.shape)}; {hint}"
        )
    if audio.shape[1] == 0:
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

    def encode_latents(self, audio: Array, lengths: Optional[Array] = None) -> Array:
        """audio `[batch, samples]` -> latents `[batch, padded_samples // hop, latent_channels]`.

        `lengths` int `[batch]`: valid samples per row (None: all). Row `b`'s first
        `config.padded_length(lengths[b]) // hop` latent frames then equal encoding
        `audio[b, :lengths[b]]` alone; the frames after them are undefined.
        """
        check_audio(audio, self.config.audio_channels)
        x = pad_audio(audio, self.config)
        x = x[..., None] if x.ndim == 2 else x  # [batch, samples, channels]
        valid = None
        if lengths is not None:
            lengths = jnp.asarray(lengths, jnp.int32)
            x = apply_mask(x, lengths)  # zeros after each clip, as its padding
            valid = padded_lengths(lengths, self.config)
        return self.encoder(x, valid)

    def _audio_out(self, x: Array) -> Array:
        """Decoder output `[batch, samples, channels]` -> the input layout."""
        return x[..., 0] if self.config.audio_channels == 1 else x

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
        length = audio.shape[1]
        z = self.encode_latents(audio)
        q = self.rvq(z, n_levels=n_levels, train=train)
        audio_hat = self._audio_out(self.decoder(q["z_q"]))
        return dict(q, audio=audio_hat[:, :length], latents=z)

    def encode(self, audio: Array, n_levels: Optional[int] = None,
               lengths: Optional[Array] = None) -> list[Array]:
        """audio `[batch, samples]` -> codes: int32 `[batch, frames_level]` per level, coarse first.

        `lengths` int `[batch]`: valid samples per row. Row `b`'s first
        `config.num_frames(lengths[b])[level]` codes equal coding the row alone; later
        frames are set to code 0.
        """
        codes = self.rvq(self.encode_latents(audio, lengths), n_levels=n_levels)["codes"]
        if lengths is None:
            return codes
        latent_frames = padded_lengths(jnp.asarray(lengths, jnp.int32), self.config) // self.config.hop_length
        return [apply_mask(c[..., None], latent_frames // s)[..., 0]
                for c, s in zip(codes, self.config.vq_strides)]

    def decode(self, codes: Sequence[Array], length: Optional[int] = None,
               lengths: Optional[Array] = None, frame_offsets: Optional[Array] = None) -> Array:
        """codes (all levels or a coarse-first prefix) -> audio `[batch, samples]`
        (`[batch, samples, channels]` for a multi-channel model).

        `length` trims SNAC's right padding. `lengths` int `[batch]`: valid samples per row;
        row `b` then equals decoding its own `config.num_frames(lengths[b])` codes alone, and
        its samples from `lengths[b]` on are zero. Noise is sampled only if a `noise` rng is
        given; `frame_offsets` int `[batch]` (absolute latent frame of each row's first frame)
        makes it a function of absolute position (see `NoiseBlock`).
        """
        valid = None
        if lengths is not None:
            lengths = jnp.asarray(lengths, jnp.int32)
            valid = padded_lengths(lengths, self.config) // self.config.hop_length
        if frame_offsets is not None:
            frame_offsets = jnp.broadcast_to(jnp.asarray(frame_offsets, jnp.int32), codes[0].shape[:1])
        audio = self.decoder(self.rvq.decode(codes), valid, frame_offsets)
        if lengths is not None:
            audio = apply_mask(audio, lengths)
        audio = self._audio_out(audio)
        return audio if length is None else audio[:, :length]


def padded_lengths(lengths: Array, config: SNACConfig) -> Array:
    """int `[batch]` valid samples -> each clip's length after SNAC's right padding."""
    m = config.pad_multiple
    return (lengths + m - 1) // m * m
