"""The GAN train step and the eval step: pure functions over `TrainState`.

One generator forward per step, as DAC's PyTorch loop (the JAX port DAC-JAX runs it twice):

1. `jax.vjp` of the generator at the current parameters gives the reconstruction,
   the quantizer losses and a VJP closure that keeps the forward's residuals.
2. The discriminator is updated on `stop_gradient(reconstruction)` and the real audio.
3. The generator losses (mel, adversarial and feature matching against the *updated*
   discriminator, as in DAC's loop, plus optional MR-STFT / waveform L1) are
   differentiated with respect to the reconstruction only, optionally through the
   EnCodec balancer, and that cotangent is pulled back through the saved VJP together
   with the quantizer-loss weights. The generator is never run forward a second time.

If any loss or gradient norm is non-finite, or the update itself produced a NaN/inf
anywhere in the *new* parameters, optimizer states, EMA codebook statistics or balancer
state (a NaN learning rate, an overflowing moment), the whole update is dropped:
everything keeps its old value and the skip is counted. The check of the new state is
one fused reduction over all its leaves, read by no one until the step's end.

`validate_hyperparameters(config)` rejects non-finite or out-of-range learning rates,
clipping norms and loss weights before anything is built, with the key's name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from codec_jax import losses as L
from codec_jax.nn.quantizer import code_health
from codec_jax.errors import UsageError
from codec_jax.training.balancer import Balancer
from codec_jax.training import optim
from codec_jax.training.builders import GeneratorAdapter
from codec_jax.training.state import TrainState, step_key

Metrics = dict[str, jax.Array]

# Generator losses computed from the reconstruction, in the order they are reported.
RECON_LOSSES = ("mel", "stft", "waveform", "adversarial", "feature_matching")
QUANTIZER_LOSSES = ("commitment", "codebook")


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The loss section of the config, resolved into hashable Python values."""

    sample_rate: int
    weights: tuple[tuple[str, float], ...]
    gan_kind: str = "least_squares"
    reduction: str = "sum"
    mel_window_lengths: tuple[int, ...] = L.DAC_MEL_WINDOW_LENGTHS
    mel_n_mels: tuple[int, ...] = L.DAC_MEL_N_MELS
    mel_window: str = "hann"
    mel_fmin: float = 0.0
    mel_fmax: Optional[float] = None
    stft_fft_sizes: tuple[int, ...] = L.DAC_STFT_WINDOW_LENGTHS
    balancer: bool = False
    balancer_total_norm: float = 1.0
    balancer_ema_decay: float = 0.999

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, sample_rate: int) -> "LossSettings":
        weights = {k: float(v) for k, v in cfg.weights.items()}
        unknown = sorted(set(weights) - set(RECON_LOSSES) - set(QUANTIZER_LOSSES))
        if unknown:
            raise UsageError(f"unknown loss weights {unknown}; known: "
                             f"{list(RECON_LOSSES + QUANTIZER_LOSSES)}")
        for name, value in weights.items():
            _check_number(f"losses.weights.{name}", value, low=0.0)
        return cls(
            sample_rate=int(sample_rate),
            weights=tuple(sorted(weights.items())),
            gan_kind=str(cfg.gan_kind),
            reduction=str(cfg.reduction),
            mel_window_lengths=tuple(int(x) for x in cfg.mel.window_lengths),
            mel_n_mels=tuple(int(x) for x in cfg.mel.n_mels),
            mel_window=str(cfg.mel.window),
            mel_fmin=float(cfg.mel.fmin),
            mel_fmax=None if cfg.mel.fmax is None else float(cfg.mel.fmax),
            stft_fft_sizes=tuple(int(x) for x in cfg.stft.fft_sizes),
            balancer=bool(cfg.balancer.enabled),
            balancer_total_norm=float(cfg.balancer.total_norm),
            balancer_ema_decay=float(cfg.balancer.ema_decay),
        )

    @property
    def weight(self) -> dict[str, float]:
        return dict(self.weights)

    def active_recon_losses(self) -> tuple[str, ...]:
        """Reconstruction losses with a non-zero weight (the others are not computed)."""
        w = self.weight
        return tuple(name for name in RECON_LOSSES if w.get(name, 0.0) != 0.0)

    def make_balancer(self) -> Optional[Balancer]:
        if not self.balancer:
            return None
        return Balancer(weights={k: self.weight[k] for k in self.active_recon_losses()},
                          total_norm=self.balancer_total_norm, ema_decay=self.balancer_ema_decay)

    def mel_loss(self, prediction: jax.Array, target: jax.Array) -> jax.Array:
        return L.mel_spectrogram_loss(
            prediction, target, sample_rate=self.sample_rate,
            window_lengths=self.mel_window_lengths, n_mels=self.mel_n_mels,
            window=self.mel_window, mel_fmin=self.mel_fmin, mel_fmax=self.mel_fmax)


def _check_number(key: str, value: Any, *, low: Optional[float] = None,
                  high: Optional[float] = None, low_open: bool = False,
                  high_open: bool = False) -> float:
    """`float(value)`, or a `UsageError` naming `key` when it is not a finite number in
    the range (`low`/`high` bounds, open when `*_open`)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key}={value!r} is not a number") from None
    if low is not None and high is not None:
        where = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        where = f" {'>' if low_open else '>='} {low:g}"
    else:
        where = ""
    bad = not math.isfinite(number)
    if low is not None:
        bad = bad or number < low or (low_open and number == low)
    if high is not None:
        bad = bad or number > high or (high_open and number == high)
    if bad:
        raise UsageError(f"{key}={value!r} must be a finite number{where}")
    return number


def validate_hyperparameters(config: ml_collections.ConfigDict) -> None:
    """Raise `UsageError` for a learning rate, schedule, clipping norm, Adam constant,
    loss weight or balancer setting that is non-finite or out of range.

    A NaN learning rate or an infinite loss weight would otherwise only show up as a
    run of skipped steps (see the module docstring); here it is named before anything
    is built.
    """
    for role in ("generator", "discriminator"):
        opt = config.optimizer[role]
        key = f"optimizer.{role}"
        _check_number(f"{key}.learning_rate", opt.learning_rate, low=0.0, high=1.0, low_open=True)
        _check_number(f"{key}.decay_rate", opt.decay_rate, low=0.0, high=1.0, low_open=True)
        _check_number(f"{key}.b1", opt.b1, low=0.0, high=1.0, high_open=True)
        _check_number(f"{key}.b2", opt.b2, low=0.0, high=1.0, high_open=True)
        _check_number(f"{key}.eps", opt.get("eps", 1e-8), low=0.0, low_open=True)
        _check_number(f"{key}.weight_decay", opt.weight_decay, low=0.0)
        # clip_norm <= 0 disables clipping (see training/optim.py); it must still be finite.
        _check_number(f"{key}.clip_norm", opt.clip_norm)
        _check_number(f"{key}.warmup_steps", opt.get("warmup_steps", 0), low=0.0)
    losses = config.losses  # weights: checked by LossSettings.from_config
    if bool(losses.balancer.enabled):
        _check_number("losses.balancer.total_norm", losses.balancer.total_norm, low=0.0,
                      low_open=True)
        _check_number("losses.balancer.ema_decay", losses.balancer.ema_decay, low=0.0,
                      high=1.0, high_open=True)


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """`[B, T]`, `[B, T]` -> `[2B, T]` as rows a0, b0, a1, b1, ...

    Interleaving (rather than concatenating) keeps each device's rows local when the
    batch axis is sharded, so one discriminator forward serves both inputs without
    moving data between devices.
    """
    return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def _deinterleave(tree: Any) -> tuple[Any, Any]:
    """Inverse of `_interleave` on every leaf: `[2B, ...]` -> (`[B, ...]`, `[B, ...]`)."""
    def split(x):
        x = x.reshape((-1, 2) + x.shape[1:])
        return x[:, 0], x[:, 1]
    pairs = jax.tree_util.tree_map(split, tree)
    first = jax.tree_util.tree_map(lambda p: p[0], pairs, is_leaf=lambda p: isinstance(p, tuple))
    second = jax.tree_util.tree_map(lambda p: p[1], pairs, is_leaf=lambda p: isinstance(p, tuple))
    return first, second


def _all_finite(*trees: Any) -> jax.Array:
    """bool `[]`: every floating-point leaf of `trees` is free of NaN and inf.

    A chain of per-leaf counts added up; counting with integers keeps it exact and immune
    to fast-math folding. Meant for small trees (scalars, codebooks, balancer state): over
    the ~1000 leaves of the new parameters and optimizer moments it made XLA's compile of
    the train step explode (tiny config on CPU: 64 s without it, over 9 minutes with it;
    `bench/bench_step_compile.py`), which is why the step checks the updates instead.
    """
    leaves = [x for t in trees for x in jax.tree_util.tree_leaves(t)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    bad = jnp.zeros((), jnp.int32)
    for x in leaves:
        bad = bad + jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)
    return bad == 0


def _updates_finite(*updates: Any) -> jax.Array:
    """bool `[]`: the optimizer updates are finite, through their global norm.

    With the old parameters and moments finite (the step keeps them so), the new ones are
    finite exactly when the updates are: a NaN learning rate, an infinite loss weight or a
    NaN already in an Adam moment all surface in the update (`m / (sqrt(v) + eps)`). One
    norm per tree has the shape of the gradient-norm reductions XLA already fuses cheaply.
    An update of norm above ~1e19 overflows the float32 sum of squares and is dropped too.
    """
    return jnp.all(jnp.stack([jnp.isfinite(optax.tree.norm(u)) for u in updates]))


def _select_by_where(ok: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)


def _select_by_cond(ok: jax.Array, new: Any, old: Any) -> Any:
    return jax.lax.cond(ok, lambda: new, lambda: old)


def _select(ok: jax.Array, new: Any, old: Any) -> Any:
    """`new` if `ok` else `old`, for whole trees (the step's skip of a non-finite update).

    On the CPU one `lax.cond` over the tree: a `where` per leaf is a `select` fusion per
    leaf for XLA's CPU backend to generate code for (~1000 state leaves in the tiny
    config; 15-19 % of the step's CPU compile, BENCHMARKS §5). Elsewhere a `where` per
    leaf: a GPU conditional copies its predicate to the host and waits for it, which would
    stall the dispatch of the next step. Same values either way.
    """
    return jax.lax.platform_dependent(ok, new, old, cpu=_select_by_cond, default=_select_by_where)


def codebook_health(codes: list[jax.Array], codebook_sizes: tuple[int, ...]) -> Metrics:
    """Per-level `batch_usage` / `batch_perplexity` (`quantizer.code_health`) of a batch of
    codes (each int32 `[batch, frames]`), level `l` out of `codebook_sizes[l]` codes."""
    out = {}
    for level, (c, size) in enumerate(zip(codes, codebook_sizes)):
        perplexity, usage = code_health(c, size)
        out[f"codebook/level_{level}/batch_usage"] = usage
        out[f"codebook/level_{level}/batch_perplexity"] = perplexity
    return out


def channels_to_batch(audio: jax.Array) -> jax.Array:
    """`[B, T]` -> itself; `[B, T, C]` -> `[B * C, T]` (row `b * C + c` is channel `c` of
    example `b`). Losses and discriminators judge each channel of a multi-channel codec
    as its own signal; the codec itself codes the channels jointly."""
    if audio.ndim == 2:
        return audio
    return jnp.moveaxis(audio, -1, 1).reshape(-1, audio.shape[1])


def make_train_step(
    *,
    generator: GeneratorAdapter,
    discriminator: Any,
    gen_tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    loss_settings: LossSettings,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, Metrics]]:
    """Build `train_step(state, batch) -> (state, metrics)`.

    batch: `{"audio": float32 [batch, samples]}` (`[batch, samples, channels]` for a
    multi-channel codec; losses see `channels_to_batch` of it). metrics: float32/int32 scalars
    (losses, grad norms, learning rates, codebook health, skip counters).
    """
    w = loss_settings.weight
    recon_names = loss_settings.active_recon_losses()
    balancer = loss_settings.make_balancer()
    gan_kind, reduction = loss_settings.gan_kind, loss_settings.reduction

    def disc_apply(params, audio):
        return discriminator.apply({"params": params}, audio)

    def recon_losses(y: jax.Array, audio: jax.Array, disc_params, real_out) -> dict[str, jax.Array]:
        """Active reconstruction losses of `y` `[B, T]` against `audio` (float32 scalars).

        The discriminator runs once on `y` for both the adversarial and the
        feature-matching loss.
        """
        values: dict[str, jax.Array] = {}
        if "mel" in recon_names:
            with jax.named_scope("mel_loss"):
                values["mel"] = loss_settings.mel_loss(y, audio)
        if "stft" in recon_names:
            with jax.named_scope("stft_loss"):
                values["stft"] = L.multi_resolution_stft_loss(
                    y, audio, fft_sizes=loss_settings.stft_fft_sizes).total
        if "waveform" in recon_names:
            values["waveform"] = L.waveform_l1_loss(y, audio)
        if "adversarial" in recon_names or "feature_matching" in recon_names:
            with jax.named_scope("fake_features"):
                fake_out = disc_apply(disc_params, y)
            if "adversarial" in recon_names:
                values["adversarial"] = L.generator_adversarial_loss(
                    fake_out, kind=gan_kind, reduction=reduction)
            if "feature_matching" in recon_names:
                values["feature_matching"] = L.feature_matching_loss(
                    real_out, fake_out, reduction=reduction)
        return values

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, Metrics]:
        model_audio = batch["audio"].astype(jnp.float32)  # the generator's input layout
        audio = channels_to_batch(model_audio)  # [B (x channels), T]: what the losses see
        key = step_key(state.rng, state.step)
        k_gen = jax.random.fold_in(key, 1)

        # 1. Generator forward, keeping the VJP. Outputs: reconstruction [B, T] and the
        #    quantizer losses (scalars); the rest rides along as aux.
        def gen_forward(params):
            out, new_codebook = generator.apply_train(params, state.codebook, model_audio, k_gen)
            vq = {name: jnp.sum(jnp.stack([jnp.mean(x) for x in out[f"{name}_loss"]]))
                  for name in QUANTIZER_LOSSES}
            aux = dict(codes=out["codes"], codebook=new_codebook,
                       quantizer_metrics=out.get("quantizer_metrics", {}),
                       levels_used=out.get("levels_used"))
            return (channels_to_batch(out["audio"].astype(jnp.float32)), vq), aux

        # The named scopes mark the phases in profiles (op_name metadata; no effect on
        # the computation): bench/profile_train_step.py adds device time up by them.
        with jax.named_scope("generator_forward"):
            (recon, vq_losses), gen_vjp, aux = jax.vjp(gen_forward, state.gen_params,
                                                       has_aux=True)

        # 2. Discriminator update on the stopped-gradient reconstruction.
        fake = jax.lax.stop_gradient(recon)

        def disc_loss_fn(params):
            real_out, fake_out = _deinterleave(disc_apply(params, _interleave(audio, fake)))
            return L.discriminator_adversarial_loss(real_out, fake_out, kind=gan_kind,
                                                    reduction=reduction)

        with jax.named_scope("discriminator_update"):
            disc_loss, disc_grads = jax.value_and_grad(disc_loss_fn)(state.disc_params)
            disc_updates, disc_opt_state = disc_tx.update(disc_grads, state.disc_opt_state,
                                                          state.disc_params)
            disc_params = optax.apply_updates(state.disc_params, disc_updates)

        # 3. Generator losses w.r.t. the reconstruction, against the updated discriminator.
        needs_real = "feature_matching" in recon_names
        with jax.named_scope("real_features"):
            real_out = (jax.lax.stop_gradient(disc_apply(disc_params, audio)) if needs_real
                        else None)
        metrics: Metrics = {}
        new_balancer = state.balancer
        if balancer is not None:
            # One function per loss, as the balancer wants; they are traced together, so
            # XLA shares the common parts (the discriminator forward) between them.
            fns = {name: (lambda y, name=name: recon_losses(y, audio, disc_params, real_out)[name])
                   for name in recon_names}
            with jax.named_scope("generator_losses"):
                recon_grad, new_balancer, bal_metrics = balancer.balance_losses(
                    fns, recon, state.balancer)
            values = {k[len("loss/"):]: v for k, v in bal_metrics.items() if k.startswith("loss/")}
            metrics.update({f"balancer/{k}": v for k, v in bal_metrics.items()
                            if not k.startswith("loss/")})
        else:
            def weighted(y):
                vals = recon_losses(y, audio, disc_params, real_out)
                return L.weighted_loss_sum(vals, w), vals
            with jax.named_scope("generator_losses"):
                (_, values), recon_grad = jax.value_and_grad(weighted, has_aux=True)(recon)
        vq_cotangent = {name: jnp.float32(w.get(name, 0.0)) for name in QUANTIZER_LOSSES}
        with jax.named_scope("generator_backward"):
            (gen_grads,) = gen_vjp((recon_grad.astype(recon.dtype), vq_cotangent))
        with jax.named_scope("generator_update"):
            gen_updates, gen_opt_state = gen_tx.update(gen_grads, state.gen_opt_state,
                                                       state.gen_params)
            gen_params = optax.apply_updates(state.gen_params, gen_updates)

        gen_total = L.weighted_loss_sum({**values, **vq_losses},
                                        {**w, **{k: w.get(k, 0.0) for k in QUANTIZER_LOSSES}})
        gen_norm = optax.tree.norm(gen_grads)
        disc_norm = optax.tree.norm(disc_grads)

        # 4. Drop the whole update if anything is non-finite: the losses and gradient
        #    norms, and also what the update produced (a NaN learning rate or a NaN
        #    already in an optimizer moment leaves the losses finite but poisons the
        #    new parameters).
        losses_ok = _all_finite(gen_total, disc_loss, gen_norm, disc_norm)
        update_ok = (_updates_finite(gen_updates, disc_updates)
                     & _all_finite(aux["codebook"], new_balancer))
        ok = losses_ok & update_ok
        kept = _select(
            ok, (gen_params, disc_params, gen_opt_state, disc_opt_state, aux["codebook"],
                 new_balancer),
            (state.gen_params, state.disc_params, state.gen_opt_state, state.disc_opt_state,
             state.codebook, state.balancer))
        new_state = TrainState(
            step=state.step + 1,
            rng=state.rng,
            gen_params=kept[0],
            disc_params=kept[1],
            gen_opt_state=kept[2],
            disc_opt_state=kept[3],
            codebook=kept[4],
            balancer=kept[5],
            skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32),
            consecutive_skips=jnp.where(ok, 0, state.consecutive_skips + 1).astype(jnp.int32),
        )

        metrics.update({f"loss/{k}": v for k, v in values.items()})
        metrics.update({f"loss/{k}": v for k, v in vq_losses.items()})
        metrics["loss/generator"] = gen_total
        metrics["loss/discriminator"] = disc_loss
        metrics["metric/si_sdr"] = jnp.mean(L.si_sdr(fake, audio))
        if "mel" not in values:  # always report the mel distance, even when not trained on
            metrics["loss/mel"] = loss_settings.mel_loss(fake, audio)
        metrics["grad_norm/generator"] = gen_norm
        metrics["grad_norm/discriminator"] = disc_norm
        metrics["lr/generator"] = optim.current_learning_rate(gen_opt_state)
        metrics["lr/discriminator"] = optim.current_learning_rate(disc_opt_state)
        metrics["skipped"] = (~ok).astype(jnp.int32)
        # Skips whose losses were finite: the update itself was non-finite.
        metrics["skipped_bad_update"] = (losses_ok & ~update_ok).astype(jnp.int32)
        metrics["skipped_total"] = new_state.skipped_steps
        metrics["consecutive_skips"] = new_state.consecutive_skips
        metrics.update(codebook_health(aux["codes"], generator.codebook_sizes))
        for name, per_level in aux["quantizer_metrics"].items():
            for level, value in enumerate(per_level):
                metrics[f"codebook/level_{level}/{name}"] = jnp.asarray(value, jnp.float32)
        if aux["levels_used"] is not None:
            metrics["codebook/levels_used"] = jnp.mean(aux["levels_used"].astype(jnp.float32))
        return new_state, metrics

    return train_step


def make_eval_step(*, generator: GeneratorAdapter, loss_settings: LossSettings
                   ) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[Metrics, jax.Array]]:
    """Build `eval_step(state, batch) -> (metrics, reconstruction [B, T])`.

    The generator runs in inference mode (no noise, no quantizer dropout, codebook
    statistics untouched). metrics: `mel`, `si_sdr`, `waveform_l1` means over the batch
    and per-level code usage / perplexity of the batch.
    """

    def eval_step(state: TrainState, batch: Mapping[str, jax.Array]):
        model_audio = batch["audio"].astype(jnp.float32)
        out = generator.apply_eval(state.gen_params, state.codebook, model_audio)
        audio = channels_to_batch(model_audio)
        recon = channels_to_batch(out["audio"].astype(jnp.float32))
        metrics = {
            "mel": loss_settings.mel_loss(recon, audio),
            "si_sdr": jnp.mean(L.si_sdr(recon, audio)),
            "waveform_l1": L.waveform_l1_loss(recon, audio),
        }
        metrics.update({k.replace("codebook/", "codes/"): v for k, v in
                        codebook_health(out["codes"], generator.codebook_sizes).items()})
        return metrics, recon

    return eval_step
