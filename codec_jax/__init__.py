"""codec_jax: SNAC-compatible multi-scale neural audio codec in JAX/Flax.

The public names below are imported on first use, so that `import codec_jax` (and
`codec-jax --help`) does not pay for importing JAX.

Rooms (a module imports only rooms listed below it):
  cli/        every `codec-jax` command (flags -> library calls)
  training/   the GAN training loop, step, state, checkpoints, sharding, optimizers
  api.py      `Codec`, `load_pretrained`, jitted encode/decode
  checkpoint.py  SNAC checkpoint import, codec save/load
  nn/         flax modules: layers, SNAC, the multi-scale RVQ, discriminators
  data/       TFDS folder builder, synthetic source, grain pipeline
  losses.py   reconstruction, adversarial and feature-matching losses
  audio/      audio file I/O, spectral transforms
  configs/    training configs (`get_config(arg)`)
  config.py   `SNACConfig`, presets
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Codec": "codec_jax.api",
    "decode": "codec_jax.api",
    "encode": "codec_jax.api",
    "encode_latents": "codec_jax.api",
    "init_variables": "codec_jax.api",
    "load_pretrained": "codec_jax.api",
    "CodesFile": "codec_jax.audio.codes_file",
    "load_codes": "codec_jax.audio.codes_file",
    "save_codes": "codec_jax.audio.codes_file",
    "CheckpointMismatchError": "codec_jax.checkpoint",
    "UnsafeCheckpointError": "codec_jax.checkpoint",
    "PRESETS": "codec_jax.config",
    "SNACConfig": "codec_jax.config",
    "get_preset": "codec_jax.config",
    "SNAC": "codec_jax.nn.snac",
    "QuantizerConfig": "codec_jax.nn.quantizer",
    "ResidualVQ": "codec_jax.nn.quantizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'codec_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
