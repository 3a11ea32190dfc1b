"""Shared defaults of every training config (DAC's recipe on a SNAC generator).

A config file calls `base_config(preset, ...)` and adjusts what differs. Sections:
model, quantizer, init, data, losses, discriminator, optimizer, mesh, train,
checkpoint, logging. Every key can be overridden on the command line, e.g.
`--config.train.batch_size=32 --config.mesh.fsdp=4`.

Derived values follow the command line. `train.batch_size` and `train.crop_seconds` are
the knobs; `data.crop_seconds` (the crop actually cut: the requested one rounded up to
the model's padding multiple), `quantizer.dead_code_threshold` and
`logging.eval_batch_size` are computed from them whenever they are read, so
`--config.train.batch_size=64` or `--config.train.crop_seconds=2` moves them too. Setting
a derived value itself (`--config.logging.eval_batch_size=8`) replaces its formula by
that value; `data.crop_seconds` set that way is used exactly, without rounding.

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
from typing import Any, Callable

import ml_collections

from codec_jax import losses as L
from codec_jax.config import get_preset
from codec_jax.data.pipeline import default_data_config
from codec_jax.training.optim import optimizer_config
from codec_jax.nn.quantizer import QuantizerConfig

VARIANTS = ("", "train", "finetune", "factorized")


def derived(fn: Callable[..., Any], *refs: ml_collections.FieldReference
            ) -> ml_collections.FieldReference:
    """A field whose value is `fn(*values of refs)`, recomputed each time it is read.

    It therefore follows overrides of `refs` made after the config was built (the
    command line's `--config.K=V`). Setting the field itself replaces the formula by
    the value set (`FieldReference.set` drops its ops).
    """
    head, *rest = refs
    return head._apply_op(fn, *rest)


def crop_seconds_for(snac, seconds: float) -> float:
    """`seconds` rounded up to a whole number of the model's padding multiple.

    SNAC pads every input on the right to `pad_multiple` samples (2048 at 24 kHz, 12288
    at 32/44.1 kHz); a 1 s crop at 32 kHz is 13 % zeros that the generator computes and
    the codebook statistics count. Rounding up keeps the computed length and makes all
    of it audio: 1 s becomes 1.024 s (24 kHz), 1.152 s (32 kHz), 1.1146 s (44.1 kHz).
    """
    samples = snac.padded_length(max(int(round(seconds * snac.sampling_rate)), 1))
    return samples / snac.sampling_rate


def dead_code_threshold_for(snac, batch_size: int, crop_seconds: float,
                            fraction: float = 0.1) -> float:
    """`fraction` (default a tenth) of the expected per-code assignment count of the
    sparsest level.

    Coarse SNAC levels see few vectors per batch (24 kHz, 16 x 1.024 s: 192 vectors for
    4096 codes at level 0), so a fixed threshold such as 2 would find nearly every code
    dead. With EMA decay 0.99, a code is then restarted after a couple of hundred steps
    without assignments.
    """
    frames = snac.frames_per_level(int(round(crop_seconds * snac.sampling_rate)))
    return fraction * batch_size * min(frames) / snac.codebook_size


def base_config(preset: str, *, batch_size: int = 16, crop_seconds: float = 1.0,
                num_steps: int = 400_000, dead_code_fraction: float = 0.1
                ) -> ml_collections.ConfigDict:
    snac = get_preset(preset)
    c = ml_collections.ConfigDict()
    batch_ref = ml_collections.FieldReference(int(batch_size))
    requested_crop = ml_collections.FieldReference(float(crop_seconds))
    crop_ref = derived(lambda s: crop_seconds_for(snac, s), requested_crop)

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
    # threshold: see `dead_code_threshold_for`; it follows the final batch and crop.
    quantizer["dead_code_threshold"] = derived(
        lambda b, s: dead_code_threshold_for(snac, b, s, dead_code_fraction),
        batch_ref.to_float(), crop_ref)
    c.quantizer = ml_collections.ConfigDict(quantizer)

    c.init = ml_collections.ConfigDict(dict(
        # SNAC hub directory (config.json + pytorch_model.bin/model.safetensors) or a
        # directory written by `codec_jax.Codec.save`. Empty: random initialisation.
        generator_checkpoint="",
    ))

    data = default_data_config()
    data.sample_rate = snac.sampling_rate
    if snac.audio_channels > 1:  # a joint multi-channel codec trains on all its channels
        data.channels = snac.audio_channels
        data.channel_mode = "keep"
    data.crop_seconds = crop_ref
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
        batch_size=batch_ref,  # global, over all devices and processes
        # Requested crop length; data.crop_seconds is this rounded up to the model's
        # padding multiple (see crop_seconds_for).
        crop_seconds=requested_crop,
        seed=0,
        # Stop the run after this many consecutive steps with non-finite losses/grads.
        max_consecutive_skips=20,
        # Persistent XLA compilation cache: a restarted (preempted) or resumed job loads
        # the compiled programs instead of compiling them again (snac_24khz on an H200:
        # first step 21.5-27.9 s where it loaded, 200+ s compiling). `{workdir}` is the
        # run's workdir; any local or gs:// directory works, also one shared between
        # runs of one config. Empty: off.
        compilation_cache_dir="{workdir}/compilation_cache",
        # On GPUs, compile the state initialiser with threefry lowered to JAX's CUDA
        # kernel instead of unrolled XLA ops (`jax_threefry_gpu_kernel_lowering`): the
        # same random bits, one kernel instead of a hash per parameter (snac_24khz on an
        # H200: 4 s of compile instead of 129 s). The train step is not affected.
        # No effect on other backends.
        threefry_gpu_kernel_init=True,
        # Compile the state initialiser with LLVM optimisation level 0 on the CPU: it
        # runs once, so its code's speed does not matter (tiny config: ~10 s of compile,
        # not ~15 s).
        fast_init_compile=True,
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
        eval_batch_size=batch_ref.identity(),  # follows train.batch_size
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
