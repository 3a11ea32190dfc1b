"""Public entry points: `load_pretrained`, the `Codec` object and pure jitted functions.

The functional forms take the variables pytree first and are jitted with the config (a
frozen dataclass) static, so they compile once per input shape and dtype and can be used
inside other jitted code.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from codec_jax import checkpoint
from codec_jax.config import PRESETS, SNACConfig, get_preset
from codec_jax.nn.snac import SNAC, check_audio
from codec_jax.nn.quantizer import QuantizerConfig

Array = jax.Array
Variables = dict[str, Any]


FACTORIZED = QuantizerConfig()


def _model(config: SNACConfig, dtype, quantizer: QuantizerConfig = FACTORIZED) -> SNAC:
    return SNAC(config, dtype=jnp.dtype(dtype), quantizer=quantizer)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "n_levels", "quantizer"))
def encode(variables: Variables, audio: Array, *, config: SNACConfig, dtype: str = "float32",
           n_levels: Optional[int] = None, quantizer: QuantizerConfig = FACTORIZED) -> list[Array]:
    """audio float `[batch, samples]` -> list of int32 `[batch, frames_level]`, coarse first.

    `quantizer` must describe the codebooks in `variables` (EMA-trained codecs keep theirs
    in the `codebook` collection)."""
    return _model(config, dtype, quantizer).apply(variables, audio, n_levels=n_levels, method=SNAC.encode)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "length", "quantizer"))
def decode(variables: Variables, codes: Sequence[Array], *, config: SNACConfig,
           dtype: str = "float32", length: Optional[int] = None,
           rng: Optional[jax.Array] = None, quantizer: QuantizerConfig = FACTORIZED) -> Array:
    """codes (all levels or a coarse-first prefix) -> float32 audio `[batch, samples]`.

    `length` trims the right padding added at encode time. With `rng=None` the noise blocks
    add nothing; with a key they sample Gaussian noise as SNAC does.
    """
    rngs = None if rng is None else {"noise": rng}
    return _model(config, dtype, quantizer).apply(variables, codes, length=length, rngs=rngs,
                                       method=SNAC.decode).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def encode_latents(variables: Variables, audio: Array, *, config: SNACConfig,
                   dtype: str = "float32") -> Array:
    """audio `[batch, samples]` -> continuous encoder output `[batch, frames, latent_channels]`."""
    return _model(config, dtype).apply(variables, audio, method=SNAC.encode_latents)


def init_variables(config: SNACConfig, rng: jax.Array | int = 0,
                   quantizer: QuantizerConfig = FACTORIZED) -> Variables:
    """Freshly initialised variables for `config` (PyTorch's default init distributions)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    # `init` runs a forward pass; on an accelerator that pass would be compiled and
    # autotuned (tens of seconds for the full presets), so initialise on the host CPU and
    # hand the arrays to the default device.
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        dummy = jnp.zeros((1, config.pad_multiple), jnp.float32)
        variables = jax.jit(_model(config, "float32", quantizer).init)(jax.device_put(rng, cpu), dummy)
    return jax.device_put(variables, jax.devices()[0])


def _as_audio(audio) -> jax.Array:
    audio = jnp.asarray(audio)
    if audio.ndim == 1:
        raise ValueError(
            f"audio must be [batch, samples]; got a 1-D array of {audio.shape[0]} samples "
            "(use audio[None] for a single clip)"
        )
    check_audio(audio)
    # Checked here, outside the jitted functions: NaN or inf would silently map to code 0.
    if not bool(jnp.all(jnp.isfinite(audio))):
        raise ValueError("audio contains NaN or infinite samples")
    return audio.astype(jnp.float32)


class Codec:
    """A SNAC codec bound to its variables: `encode(audio)` / `decode(codes, length, rng)`.

    `dtype` selects the compute dtype ("float32" or "bfloat16"); parameters stay float32.
    """

    def __init__(self, config: SNACConfig, variables: Variables, dtype: str = "float32",
                 quantizer: QuantizerConfig = FACTORIZED):
        self.config = config
        self.quantizer = quantizer
        self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
        self.dtype = dtype

    @property
    def params(self):
        return self.variables["params"]

    @property
    def sample_rate(self) -> int:
        return self.config.sampling_rate

    def encode(self, audio, n_levels: Optional[int] = None) -> list[Array]:
        """float32 `[batch, samples]` (numpy or jax) -> list of int32 `[batch, frames_level]`."""
        return encode(self.variables, _as_audio(audio), config=self.config, dtype=self.dtype,
                      n_levels=n_levels, quantizer=self.quantizer)

    def decode(self, codes: Sequence[Any], length: Optional[int] = None,
               rng: Optional[jax.Array] = None) -> Array:
        """codes -> float32 `[batch, samples]`; see `codec_jax.decode`."""
        codes = [jnp.asarray(c, jnp.int32) for c in codes]
        self._check_codes(codes)
        return decode(self.variables, codes, config=self.config, dtype=self.dtype,
                      length=length, rng=rng, quantizer=self.quantizer)

    def _check_codes(self, codes: Sequence[Array]) -> None:
        c = self.config
        if not 1 <= len(codes) <= c.n_levels:
            raise ValueError(f"expected 1..{c.n_levels} code levels (coarse first), got {len(codes)}")
        finest = None
        for level, (stride, x) in enumerate(zip(c.vq_strides, codes)):
            if x.ndim != 2:
                raise ValueError(f"codes[{level}] must be [batch, frames], got shape {x.shape}")
            if x.shape[1] == 0:
                raise ValueError(f"codes[{level}] has no frames: nothing to decode")
            frames = x.shape[1] * stride
            if finest is None:
                finest = frames
            elif frames != finest:
                raise ValueError(
                    f"codes[{level}] has {x.shape[1]} frames; with stride {stride} it should have "
                    f"{finest // stride} to match level 0"
                )
        sizes = self.quantizer.level_codebook_sizes(c.n_levels, c.codebook_size)
        # One device-to-host transfer for every level's range, not two per level.
        bounds = jax.device_get([(jnp.min(x), jnp.max(x)) for x in codes])
        for level, (size, (lo, hi)) in enumerate(zip(sizes, bounds)):
            if lo < 0 or hi >= size:
                raise ValueError(f"codes[{level}]: code values must be in [0, {size}), got [{lo}, {hi}]")

    def save(self, path: str | os.PathLike) -> None:
        """Write `config.json` + orbax variables; `load_pretrained(path)` reads them back."""
        checkpoint.save_converted(path, self.config, self.variables, self.quantizer)


def load_pretrained(path: str | os.PathLike, dtype: str = "float32") -> Codec:
    """Load a codec from a directory or a preset name.

    - SNAC hub-style directory (`config.json` + `pytorch_model.bin` or `model.safetensors`):
      imported without torch and without executing pickled code;
    - a directory written by `Codec.save` (orbax);
    - a preset name (`snac_24khz`, `snac_32khz`, `snac_44khz`, `tiny`) gives randomly
      initialised weights (no download ever happens).
    """
    p = Path(path)
    if p.is_dir():
        if (p / checkpoint.PARAMS_SUBDIR).exists():
            config, variables, quantizer = checkpoint.load_converted(p)
            return Codec(config, variables, dtype=dtype, quantizer=quantizer)
        config, params = checkpoint.load_snac_directory(p)
        return Codec(config, {"params": params}, dtype=dtype)
    from codec_jax.errors import PathNotFoundError

    if isinstance(path, str) and not os.sep in path:
        try:
            config = get_preset(path)
        except ValueError:
            raise PathNotFoundError(
                f"{path!r} is neither a model directory nor a preset name (presets: "
                f"{', '.join(sorted(PRESETS))})") from None
        return Codec(config, init_variables(config), dtype=dtype)
    raise PathNotFoundError(f"{path}: no such model directory")
