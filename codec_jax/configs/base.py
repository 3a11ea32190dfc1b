"""Shared defaults of every training config (DAC's recipe on a SNAC generator).

A config file calls `base_config(preset, ...)` and adjusts what differs. Sections:
model, quantizer, init, data, losses, discriminator, optimizer, mesh, train,
checkpoint, logging. Every key can be overridden on the command line, e.g.
`--config.train.batch_size=32 --config.mesh.fsdp=4`.

Variants (the part after `:` in `--config configs/X.py:VARIANT`):
  ""/"train"     train from scratch;
  "finetune"     start the generator from an imported SNAC checkpoint
                 (`--config.init.generator_checkpoint=/path/to/snac_dir`), fresh
                 discriminators, lower learning rate;
  "factorized"   SNAC's own gradient-trained factorized codebooks instead of EMA ones.
Variants combine with commas: `configs/snac_24khz.py:finetune,factorized`.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from codec_jax import losses as L
from codec_jax.config import get_preset
from codec_jax.data.pipeline import default_data_config
from codec_jax.training.optim import optimizer_config
from codec_jax.nn.quantizer import QuantizerConfig

VARIANTS = ("", "train", "finetune", "factorized")


def base_config(preset: str, *, batch_size: int = 16, crop_seconds: float = 1.0,
                num_steps: int = 400_000) -> ml_collections.ConfigDict:
    snac = get_preset(preset)
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(dict(
        preset=preset,
        # SNACConfig fields to change on top of the preset, e.g. {"noise": False}.
        overrides=ml_collections.ConfigDict(),
        # Compute dtype; parameters and optimizer state are always float32.
        dtype="bfloat16",
    ))

    # Codebook learning: the fields of `codec_jax.nn.quantizer.QuantizerConfig`.
    # "ema": k-means initialised EMA codebooks with dead-code restarts (not touched by
    # the optimizer; their statistics live in the train state). "factorized": SNAC's
    # gradient-trained codebooks with the codebook loss.
    quantizer = dataclasses.asdict(QuantizerConfig(kind="ema"))
    quantizer["codebook_sizes"] = ml_collections.FieldReference(None, field_type=tuple)
    # A code is dead when its EMA assignment count (vectors per batch) drops below the
    # threshold. Coarse SNAC levels see few vectors per batch (24 kHz, 16 x 1 s: 192
    # vectors for 4096 codes at level 0), so the threshold is a tenth of the expected
    # count of the sparsest level rather than a fixed 2: with EMA decay 0.99 a code is
    # then restarted after a couple of hundred steps without assignments.
    frames = snac.frames_per_level(int(round(crop_seconds * snac.sampling_rate)))
    quantizer["dead_code_threshold"] = 0.1 * batch_size * min(frames) / snac.codebook_size
    c.quantizer = ml_collections.ConfigDict(quantizer)

    c.init = ml_collections.ConfigDict(dict(
        # SNAC hub directory (config.json + pytorch_model.bin/model.safetensors) or a
        # directory written by `codec_jax.Codec.save`. Empty: random initialisation.
        generator_checkpoint="",
    ))

    data = default_data_config()
    data.sample_rate = snac.sampling_rate
    data.crop_seconds = crop_seconds
    c.data = data

    c.losses = ml_collections.ConfigDict(dict(
        # DAC's lambdas; stft and waveform are off by default (0 = not computed).
        weights=ml_collections.ConfigDict(dict(L.DEFAULT_LOSS_WEIGHTS, stft=0.0, waveform=0.0)),
        gan_kind="least_squares",  # or "hinge" (EnCodec)
        reduction="sum",  # DAC sums over sub-discriminators and layers; "mean": EnCodec
        mel=ml_collections.ConfigDict(dict(
            window_lengths=tuple(L.DAC_MEL_WINDOW_LENGTHS),
            n_mels=tuple(L.DAC_MEL_N_MELS),
            window="hann",
            fmin=0.0,
            fmax=ml_collections.FieldReference(None, field_type=float),
        )),
        stft=ml_collections.ConfigDict(dict(fft_sizes=tuple(L.DAC_STFT_WINDOW_LENGTHS))),
        # EnCodec's gradient balancer over the reconstruction losses.
        balancer=ml_collections.ConfigDict(dict(enabled=False, total_norm=1.0, ema_decay=0.999)),
    ))

    c.discriminator = ml_collections.ConfigDict(dict(
        kinds=("mpd", "mrd"),  # any of "mpd", "mrd", "msstft"
        periods=(2, 3, 5, 7, 11),
        mrd_window_lengths=(2048, 1024, 512),
        msstft_n_ffts=(1024, 2048, 512),
        channel_scale=1.0,
        normalize_input=True,
    ))

    c.optimizer = ml_collections.ConfigDict(dict(
        generator=optimizer_config(clip_norm=1e3),
        discriminator=optimizer_config(clip_norm=10.0),
    ))

    c.mesh = ml_collections.ConfigDict(dict(
        data=-1,  # -1: all devices not used by fsdp
        fsdp=1,
        # Arrays with fewer elements than this stay replicated under fsdp.
        fsdp_min_size=2 ** 14,
    ))

    c.train = ml_collections.ConfigDict(dict(
        num_steps=num_steps,
        batch_size=batch_size,  # global, over all devices and processes
        seed=0,
        # Stop the run after this many consecutive steps with non-finite losses/grads.
        max_consecutive_skips=20,
        # Persistent XLA compilation cache: a restarted (preempted) job skips
        # recompiling. Empty: off.
        compilation_cache_dir="",
        # Exit status of `codec-jax train` after a SIGTERM (preemption) save: non-zero,
        # so that a scheduler restarts the job instead of marking it done.
        preemption_exit_code=143,
    ))

    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=5000,
        keep=3,
        async_save=True,
    ))

    c.logging = ml_collections.ConfigDict(dict(
        every_steps=100,
        eval_every_steps=5000,
        eval_batches=8,
        eval_batch_size=batch_size,
        num_audio_samples=4,
        # PESQ-wb, STOI and ViSQOL of the eval clips (codec_jax/evaluation.py), computed in
        # CPU worker processes: seconds per eval on the full presets, which turn it on.
        eval_perceptual=False,
        # Also append logged scalars to workdir/metrics.jsonl (for notebooks and tests).
        jsonl=True,
    ))
    return c


def apply_variants(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply comma-separated variants (see the module docstring) in order."""
    for variant in (arg or "").split(","):
        variant = variant.strip()
        if variant not in VARIANTS:
            raise ValueError(f"unknown config variant {variant!r}; choose from {VARIANTS[1:]}")
        if variant == "finetune":
            for opt in (c.optimizer.generator, c.optimizer.discriminator):
                opt.learning_rate = opt.learning_rate * 0.1
            # Imported SNAC checkpoints hold factorized codebooks.
            c.quantizer.kind = "factorized"
        elif variant == "factorized":
            c.quantizer.kind = "factorized"
    return c
