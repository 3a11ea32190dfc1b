"""EnCodec's gradient-norm loss balancer, functional (a training concern, not a loss).

Used by `codec_jax.training.step` when `config.losses.balancer.enabled`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp



class BalancerState(NamedTuple):
    """EMA statistics of per-loss gradient norms (a pytree; keep it in the train state).

    ``norm_ema[k] / weight_ema[k]`` is the bias-corrected EMA of loss ``k``'s
    gradient norm (EnCodec's ``averager``: the first update returns the raw norm).
    """

    norm_ema: dict[str, jax.Array]
    weight_ema: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Balancer:
    """EnCodec's gradient-norm loss balancer, functional (``encodec/balancer.py``).

    Instead of back-propagating ``sum(w_k * loss_k)``, take each loss's gradient
    ``g_k`` with respect to the **model output** (the reconstructed audio),
    rescale it to ``g_k * (w_k / sum(w)) * total_norm / (eps + ema(||g_k||))``
    and sum. Each loss then contributes a gradient of norm proportional to its
    weight whatever the raw scale of the loss, and the combined output gradient
    is pulled back through the model with the model's VJP.

    Usage in a train step::

        balancer = Balancer(weights={"mel": 15.0, "adversarial": 1.0, "feature_matching": 2.0})
        state = balancer.init()                      # once, stored in the train state
        audio_out, model_vjp = jax.vjp(lambda p: generator.apply(p, audio), params)
        output_grad, state, metrics = balancer.balance_losses(
            {"mel": lambda y: mel_spectrogram_loss(y, audio, sample_rate=sr), ...},
            audio_out, state)
        (param_grads,) = model_vjp(output_grad)
        # losses not routed through the model output (commitment, codebook) are
        # differentiated w.r.t. the params as usual and added to param_grads.

    Attributes:
      weights: loss name -> weight; only losses passed to the call are balanced,
        and ratios are ``w_k / sum(w of the losses passed)`` (as EnCodec).
      rescale_grads: False gives the plain weighted sum ``sum(w_k * g_k)``.
      total_norm: norm the balanced gradient is scaled to (before EMA lag).
      ema_decay: EMA decay of the gradient norms (EnCodec default 0.999).
      per_batch_item: measure norms per batch item (over all non-batch axes) and
        average, rather than over the whole batch gradient.
      epsilon: added to the norm before dividing.

    Under ``jit`` with a batch-sharded output the norms are already global batch
    means, which is what EnCodec's cross-worker ``average_metrics`` computes.
    """

    weights: Mapping[str, float]
    rescale_grads: bool = True
    total_norm: float = 1.0
    ema_decay: float = 0.999
    per_batch_item: bool = True
    epsilon: float = 1e-12

    def init(self, names: Sequence[str] | None = None) -> BalancerState:
        """Zero EMA state for ``names`` (default: every weighted loss)."""
        names = list(self.weights) if names is None else list(names)
        zeros = {name: jnp.zeros((), jnp.float32) for name in names}
        return BalancerState(norm_ema=dict(zeros), weight_ema=dict(zeros))

    def _gradient_norm(self, grad: jax.Array) -> jax.Array:
        grad = jnp.asarray(grad, jnp.float32)
        if self.per_batch_item:
            per_item = jnp.sqrt(jnp.sum(grad.reshape(grad.shape[0], -1) ** 2, axis=-1))
            return jnp.mean(per_item)
        return jnp.sqrt(jnp.sum(grad**2))

    def balance_gradients(
        self, grads: Mapping[str, jax.Array], state: BalancerState
    ) -> tuple[jax.Array, BalancerState, dict[str, jax.Array]]:
        """Combine per-loss gradients w.r.t. the same model output.

        Args:
          grads: loss name -> gradient of that loss w.r.t. the model output, all
            of one shape, e.g. ``[batch, samples]``.
          state: from :meth:`init` or the previous call; must contain every name.

        Returns:
          ``(combined_grad, new_state, metrics)``: combined gradient, same shape
          and dtype as the inputs; updated EMA state; float32 metrics
          ``grad_norm/<name>`` (raw norm this step) and ``grad_ratio/<name>``
          (EMA norm share, EnCodec's ``monitor`` output).
        """
        unknown = sorted(set(grads) - set(self.weights))
        if unknown:
            raise KeyError(f"no weight for losses {unknown}")
        norms = {name: self._gradient_norm(grad) for name, grad in grads.items()}
        norm_ema = dict(state.norm_ema)
        weight_ema = dict(state.weight_ema)
        for name, norm in norms.items():
            norm_ema[name] = self.ema_decay * state.norm_ema[name] + norm
            weight_ema[name] = self.ema_decay * state.weight_ema[name] + 1.0
        average_norms = {name: norm_ema[name] / weight_ema[name] for name in grads}
        total_weight = sum(self.weights[name] for name in grads)
        norm_sum = sum(average_norms.values())
        metrics: dict[str, jax.Array] = {}
        combined = None
        for name, grad in grads.items():
            if self.rescale_grads:
                scale = (self.weights[name] / total_weight) * self.total_norm / (self.epsilon + average_norms[name])
            else:
                scale = jnp.float32(self.weights[name])
            part = jnp.asarray(grad, jnp.float32) * scale
            combined = part if combined is None else combined + part
            metrics[f"grad_norm/{name}"] = norms[name]
            metrics[f"grad_ratio/{name}"] = average_norms[name] / norm_sum
        first = next(iter(grads.values()))
        return combined.astype(first.dtype), BalancerState(norm_ema, weight_ema), metrics

    def balance_losses(
        self,
        loss_fns: Mapping[str, Callable[[jax.Array], jax.Array]],
        output: jax.Array,
        state: BalancerState,
    ) -> tuple[jax.Array, BalancerState, dict[str, jax.Array]]:
        """Differentiate each ``loss_fns[k](output)`` w.r.t. ``output`` and balance.

        One forward pass through all losses (shared sub-computations such as a
        discriminator forward are traced once), then one VJP per loss.

        Returns:
          ``(combined_grad, new_state, metrics)`` as :meth:`balance_gradients`,
          with metrics also holding ``loss/<name>`` (float32 loss values).
        """
        names = list(loss_fns)

        def all_losses(y: jax.Array) -> dict[str, jax.Array]:
            return {name: jnp.asarray(loss_fns[name](y), jnp.float32) for name in names}

        values, vjp = jax.vjp(all_losses, output)
        grads = {}
        for name in names:
            cotangent = {other: jnp.float32(1.0 if other == name else 0.0) for other in names}
            (grads[name],) = vjp(cotangent)
        combined, state, metrics = self.balance_gradients(grads, state)
        metrics.update({f"loss/{name}": value for name, value in values.items()})
        return combined, state, metrics
