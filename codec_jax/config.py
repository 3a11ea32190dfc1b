"""Model configuration: exactly the keys of SNAC's `config.json`, plus named presets."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional, Sequence

# The keys a SNAC `config.json` holds, in SNAC's constructor order.
SNAC_CONFIG_KEYS = (
    "sampling_rate",
    "encoder_dim",
    "encoder_rates",
    "latent_dim",
    "decoder_dim",
    "decoder_rates",
    "attn_window_size",
    "codebook_size",
    "codebook_dim",
    "vq_strides",
    "noise",
    "depthwise",
)
# codec_jax's own architecture keys, written to config.json only when they differ from
# their default (so a mono config round-trips to exactly SNAC's keys).
EXTENSION_KEYS = ("audio_channels",)


def bits_per_frame(strides: Sequence[int], codebook_sizes: Sequence[int],
                   n_levels: Optional[int] = None) -> float:
    """Bits per finest latent frame carried by the first `n_levels` levels (all by default):
    `sum(log2(codebook_size_l) / stride_l)`. The one bitrate formula of the project."""
    n_levels = len(strides) if n_levels is None else n_levels
    if not 1 <= n_levels <= len(strides):
        raise ValueError(f"n_levels must be in [1, {len(strides)}], got {n_levels}")
    if len(codebook_sizes) != len(strides):
        raise ValueError(f"{len(codebook_sizes)} codebook sizes for {len(strides)} strides")
    return sum(math.log2(k) / s for k, s in zip(codebook_sizes[:n_levels], strides[:n_levels]))


@dataclasses.dataclass(frozen=True)
class SNACConfig:
    """Architecture of a SNAC codec; field names and defaults are SNAC's own.

    Sequences are stored as tuples so that the config is hashable and can be a
    static argument of jitted functions.
    """

    sampling_rate: int = 44100
    encoder_dim: int = 64
    encoder_rates: tuple[int, ...] = (3, 3, 7, 7)
    latent_dim: Optional[int] = None
    decoder_dim: int = 1536
    decoder_rates: tuple[int, ...] = (7, 7, 3, 3)
    attn_window_size: Optional[int] = 32
    codebook_size: int = 4096
    codebook_dim: int = 8
    vq_strides: tuple[int, ...] = (8, 4, 2, 1)
    noise: bool = True
    depthwise: bool = True
    # Channels coded jointly (codec_jax extension; SNAC is mono): the encoder's first conv
    # reads them all and the decoder's last conv writes them all; audio is then
    # `[batch, samples, channels]`.
    audio_channels: int = 1

    def __post_init__(self):
        for name in ("encoder_rates", "decoder_rates", "vq_strides"):
            value = getattr(self, name)
            if isinstance(value, (int,)) or not isinstance(value, Sequence):
                raise ValueError(f"SNACConfig.{name} must be a sequence of ints, got {value!r}")
            object.__setattr__(self, name, tuple(int(v) for v in value))
        if any(v < 1 for v in self.encoder_rates + self.decoder_rates + self.vq_strides):
            raise ValueError(f"rates and strides must be >= 1: {self}")
        if not self.vq_strides:
            raise ValueError("vq_strides must name at least one quantizer level")
        if int(self.audio_channels) < 1:
            raise ValueError(f"audio_channels must be >= 1, got {self.audio_channels}")
        if self.decoder_dim % (2 ** len(self.decoder_rates)):
            raise ValueError(
                f"decoder_dim={self.decoder_dim} must be divisible by 2**len(decoder_rates)"
                f"={2 ** len(self.decoder_rates)}"
            )
        if self.attn_window_size is not None:
            for dim in (self.latent_channels, self.decoder_dim):
                if dim % 64:
                    raise ValueError(
                        f"attention needs channel counts divisible by the head size 64, got {dim}"
                    )

    # ---- derived quantities -------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Channels of the encoder output (SNAC's `latent_dim` once resolved)."""
        if self.latent_dim is not None:
            return int(self.latent_dim)
        return self.encoder_dim * 2 ** len(self.encoder_rates)

    @property
    def hop_length(self) -> int:
        """Audio samples per finest latent frame."""
        return int(math.prod(self.encoder_rates))

    @property
    def pad_multiple(self) -> int:
        """Encode pads audio on the right to a multiple of this many samples (SNAC's preprocess)."""
        return self.hop_length * math.lcm(self.vq_strides[0], self.attn_window_size or 1)

    @property
    def n_levels(self) -> int:
        return len(self.vq_strides)

    def padded_length(self, num_samples: int) -> int:
        return math.ceil(num_samples / self.pad_multiple) * self.pad_multiple

    def frames_per_level(self, num_samples: int) -> list[int]:
        """Code frames of each level (coarse first) for a clip of `num_samples` samples."""
        latent_frames = self.padded_length(num_samples) // self.hop_length
        return [latent_frames // s for s in self.vq_strides]

    def num_frames(self, length: int) -> tuple[int, ...]:
        """Code frames per level (coarse first) that encoding a clip of `length` samples gives:
        SNAC pads it on the right to a multiple of `pad_multiple`. In a batch coded with
        `lengths=`, row `b`'s valid frames at level `l` are `num_frames(lengths[b])[l]`."""
        if int(length) < 1:
            raise ValueError(f"a clip needs at least one sample, got length={length}")
        return tuple(self.frames_per_level(int(length)))

    def bitrate(self, n_levels: Optional[int] = None,
                codebook_sizes: Optional[Sequence[int]] = None) -> float:
        """Bits per second carried by the first `n_levels` levels (all by default), each
        level `l` coding `log2(codebook_sizes[l])` bits per code (default: `codebook_size`
        for every level). A codec trained with per-level sizes has them in its
        `QuantizerConfig`: `codec_jax.nn.quantizer.bitrate(config, quantizer=...)` passes them.
        """
        sizes = (self.codebook_size,) * self.n_levels if codebook_sizes is None else codebook_sizes
        frame_rate = self.sampling_rate / self.hop_length
        return frame_rate * bits_per_frame(self.vq_strides, sizes, n_levels)

    # ---- (de)serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("encoder_rates", "decoder_rates", "vq_strides"):
            out[name] = list(out[name])
        for name in EXTENSION_KEYS:
            if out[name] == getattr(SNACConfig, name):
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SNACConfig":
        unknown = sorted(set(data) - set(SNAC_CONFIG_KEYS) - set(EXTENSION_KEYS))
        if unknown:
            raise ValueError(
                f"unknown SNAC config keys {unknown}; expected a subset of "
                f"{list(SNAC_CONFIG_KEYS) + list(EXTENSION_KEYS)}"
            )
        # A config.json is user input: check the JSON types before the dataclass sees them.
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name, value in data.items():
            if name in ("noise", "depthwise"):
                ok = isinstance(value, bool)
            elif name in ("encoder_rates", "decoder_rates", "vq_strides"):
                ok = isinstance(value, (list, tuple)) and all(is_int(v) for v in value)
            elif name in ("latent_dim", "attn_window_size"):
                ok = value is None or (is_int(value) and value >= 1)
            else:
                ok = is_int(value) and value >= 1
            if not ok:
                raise ValueError(f"SNAC config key {name!r} has an invalid value {value!r}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "SNACConfig":
        from etils import epath  # local or gs:// paths

        try:
            data = json.loads(epath.Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of SNAC config keys")
        return cls.from_dict(data)

    def to_json(self, path: str | os.PathLike) -> None:
        from etils import epath  # local or gs:// paths

        epath.Path(path).write_text(json.dumps(self.to_dict(), indent=2))


PRESETS: dict[str, SNACConfig] = {
    # The published hubertsiuzdak/snac_* configurations.
    "snac_24khz": SNACConfig(
        sampling_rate=24000,
        encoder_dim=48,
        encoder_rates=(2, 4, 8, 8),
        decoder_dim=1024,
        decoder_rates=(8, 8, 4, 2),
        attn_window_size=None,
        codebook_size=4096,
        codebook_dim=8,
        vq_strides=(4, 2, 1),
        noise=True,
        depthwise=True,
    ),
    "snac_32khz": SNACConfig(
        sampling_rate=32000,
        encoder_dim=64,
        encoder_rates=(2, 3, 8, 8),
        decoder_dim=1536,
        decoder_rates=(8, 8, 3, 2),
        attn_window_size=32,
        codebook_size=4096,
        codebook_dim=8,
        vq_strides=(8, 4, 2, 1),
        noise=True,
        depthwise=True,
    ),
    # Small enough for CPU tests and smoke training, yet it exercises every
    # code path: odd stride (3), attention with 2 heads, depthwise, noise, 3 levels.
    "tiny": SNACConfig(
        sampling_rate=16000,
        encoder_dim=8,
        encoder_rates=(2, 3, 4),
        latent_dim=None,
        decoder_dim=128,
        decoder_rates=(4, 3, 2),
        attn_window_size=4,
        codebook_size=64,
        codebook_dim=4,
        vq_strides=(4, 2, 1),
        noise=True,
        depthwise=True,
    ),
}


# The published 44.1 kHz model is the 32 kHz architecture at another sampling rate.
PRESETS["snac_44khz"] = dataclasses.replace(PRESETS["snac_32khz"], sampling_rate=44100)
# Stereo at 48 kHz (no published weights; train it with configs/snac_48khz_stereo.py): the
# 32/44.1 kHz architecture with a 512-sample hop (2*4*8*8), both channels coded jointly into
# one code stream per level. Frame rates 93.75 Hz (finest) down to 11.7 Hz (coarsest).
PRESETS["snac_48khz_stereo"] = dataclasses.replace(
    PRESETS["snac_32khz"], sampling_rate=48000, encoder_rates=(2, 4, 8, 8),
    decoder_rates=(8, 8, 4, 2), audio_channels=2)
# The tiny CPU model, stereo: tests and smoke training of the joint-channel path.
PRESETS["tiny_stereo"] = dataclasses.replace(PRESETS["tiny"], audio_channels=2)


def get_preset(name: str) -> SNACConfig:
    try:
        return PRESETS[name]
    except KeyError:
        from codec_jax.errors import UsageError  # a ValueError too

        raise UsageError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
