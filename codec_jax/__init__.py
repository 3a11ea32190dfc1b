"""codec_jax: SNAC-compatible multi-scale neural audio codec in JAX/Flax."""

from codec_jax.api import Codec, decode, encode, encode_latents, init_variables, load_pretrained
from codec_jax.checkpoint import CheckpointMismatchError, UnsafeCheckpointError
from codec_jax.config import PRESETS, SNACConfig, get_preset
from codec_jax.models import SNAC

__all__ = [
    "Codec",
    "CheckpointMismatchError",
    "PRESETS",
    "SNAC",
    "SNACConfig",
    "UnsafeCheckpointError",
    "decode",
    "encode",
    "encode_latents",
    "get_preset",
    "init_variables",
    "load_pretrained",
]
