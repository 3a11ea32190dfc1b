"""Optimizers for GAN codec training: AdamW with exponential decay and global-norm clipping.

Defaults follow DAC (`conf/base.yml`): AdamW(lr 1e-4, betas (0.8, 0.99)), an
exponential learning-rate decay of 0.999996 per step, and gradients clipped to a global
norm of 1e3 (generator) and 10 (discriminator) before the Adam moments see them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up (optional) followed by ``lr * decay_rate ** (step - warmup)``.

    Config keys: ``learning_rate``, ``decay_rate`` (per step; 1.0 disables decay),
    ``warmup_steps``.
    """
    lr = float(cfg.learning_rate)
    decay = optax.exponential_decay(lr, transition_steps=1, decay_rate=float(cfg.decay_rate))
    warmup = int(cfg.get("warmup_steps", 0))
    if warmup <= 0:
        return decay
    ramp = optax.linear_schedule(0.0, lr, warmup)
    return optax.join_schedules([ramp, decay], [warmup])


def _decay_mask(decay_vectors: bool):
    # Weight decay on 1-D parameters (biases, weight-norm magnitudes, Snake alphas) is what
    # DAC does (torch AdamW decays every parameter); `decay_vectors=False` restricts it to
    # kernels, the usual choice for transformers.
    if decay_vectors:
        return None
    return lambda params: jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def build_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """``clip_by_global_norm(cfg.clip_norm)`` then AdamW with the schedule above.

    The learning rate is injected as a hyperparameter so that the value used for each
    update is readable from the state (:func:`current_learning_rate`) for logging.
    ``clip_norm <= 0`` disables clipping.
    """
    # `mask` must be static: inject_hyperparams calls every callable argument with the step
    # count as if it were a schedule, which turned the kernel-only mask into "decay nothing".
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=learning_rate_schedule(cfg),
        b1=float(cfg.b1),
        b2=float(cfg.b2),
        eps=float(cfg.get("eps", 1e-8)),
        weight_decay=float(cfg.weight_decay),
        mask=_decay_mask(bool(cfg.get("decay_vectors", True))),
    )
    clip = float(cfg.clip_norm)
    clipper = optax.clip_by_global_norm(clip) if clip > 0 else optax.identity()
    return optax.chain(clipper, adamw)


def current_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate of the last update made with a :func:`build_optimizer` state."""
    return jnp.asarray(opt_state[1].hyperparams["learning_rate"], jnp.float32)


def optimizer_config(*, learning_rate: float = 1e-4, b1: float = 0.8, b2: float = 0.99,
                     weight_decay: float = 0.01, decay_rate: float = 0.999996,
                     clip_norm: float = 1e3, warmup_steps: int = 0,
                     decay_vectors: bool = True) -> ml_collections.ConfigDict:
    """A config section for :func:`build_optimizer` with DAC's defaults."""
    return ml_collections.ConfigDict(dict(
        learning_rate=learning_rate, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay,
        decay_rate=decay_rate, clip_norm=clip_norm, warmup_steps=warmup_steps,
        decay_vectors=decay_vectors,
    ))
