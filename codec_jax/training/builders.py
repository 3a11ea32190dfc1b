"""Generator and discriminator modules built from a training config.

`GeneratorAdapter` gives the train and eval steps one calling convention for the
generator (`SNAC`): training mode with its rng streams and the mutable `codebook`
collection, inference mode without noise, and `init`. Keeping the flax plumbing here
keeps `train_step.py` about the GAN algorithm.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from codec_jax.config import SNACConfig, get_preset
from codec_jax.nn.discriminators import Discriminator
from codec_jax.nn.snac import SNAC
from codec_jax.nn.quantizer import QuantizerConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def snac_config_from(cfg: ml_collections.ConfigDict) -> SNACConfig:
    """`model.preset` with `model.overrides` (SNACConfig fields) applied."""
    base = get_preset(cfg.preset)
    overrides = dict(cfg.get("overrides", {}) or {})
    return dataclasses.replace(base, **overrides) if overrides else base


@dataclasses.dataclass(frozen=True)
class GeneratorAdapter:
    """The SNAC generator with the calling conventions the train step needs."""

    config: SNACConfig
    module: SNAC

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        """Codebook size of each quantizer level (coarse first), per-level sizes included."""
        return self.module.quantizer.level_codebook_sizes(self.config.n_levels,
                                                          self.config.codebook_size)

    def init(self, key: jax.Array, num_samples: int) -> dict[str, Any]:
        """Fresh variables: `params`, and `codebook` when the quantizer keeps EMA state."""
        channels = self.config.audio_channels
        dummy = jnp.zeros((1, num_samples) + ((channels,) if channels > 1 else ()), jnp.float32)
        return dict(self.module.init({"params": key}, dummy))

    @staticmethod
    def _variables(params: Any, codebook: Any) -> dict[str, Any]:
        return {"params": params, "codebook": codebook} if codebook else {"params": params}

    def apply_train(self, params: Any, codebook: Any, audio: jax.Array, key: jax.Array
                    ) -> tuple[dict[str, Any], Any]:
        """Training forward: audio `[B, T]` -> (outputs, new codebook collection).

        `key` feeds the decoder noise and the quantizer (dropout, k-means init, dead-code
        restarts). Outputs hold `audio` `[B, T]`, `codes` (list of int32
        `[B, frames_level]`), per-level `commitment_loss` / `codebook_loss` (`[B]` each),
        `quantizer_metrics` (per-level arrays) and `levels_used` `[B]`.
        """
        k_noise, k_quantizer = jax.random.split(key)
        out, mutated = self.module.apply(
            self._variables(params, codebook), audio, train=True,
            rngs={"noise": k_noise, "quantizer": k_quantizer}, mutable=["codebook"])
        return out, mutated.get("codebook", codebook)

    def apply_eval(self, params: Any, codebook: Any, audio: jax.Array) -> dict[str, Any]:
        """Inference forward (no noise, no quantizer dropout, codebooks untouched)."""
        return self.module.apply(self._variables(params, codebook), audio, train=False)


def quantizer_config_from(cfg: ml_collections.ConfigDict) -> QuantizerConfig:
    """`QuantizerConfig` from the `quantizer` config section (its field names)."""
    return QuantizerConfig.from_dict(cfg.to_dict())


def build_generator(config: ml_collections.ConfigDict) -> GeneratorAdapter:
    snac_config = snac_config_from(config.model)
    module = SNAC(snac_config, dtype=compute_dtype(config.model.dtype),
                  quantizer=quantizer_config_from(config.quantizer))
    return GeneratorAdapter(snac_config, module)


def build_discriminator(config: ml_collections.ConfigDict) -> Discriminator:
    """`Discriminator` with the kinds and sizes of `config.discriminator`."""
    d = config.discriminator
    return Discriminator(
        kinds=tuple(d.kinds),
        periods=tuple(d.periods),
        mrd_window_lengths=tuple(d.mrd_window_lengths),
        msstft_n_ffts=tuple(d.msstft_n_ffts),
        channel_scale=float(d.channel_scale),
        normalize_input=bool(d.normalize_input),
        dtype=compute_dtype(config.model.dtype),
    )


def init_discriminator(discriminator: Discriminator, key: jax.Array, num_samples: int
                       ) -> dict[str, Any]:
    return dict(discriminator.init(key, jnp.zeros((1, num_samples), jnp.float32)))
