"""Multi-scale residual vector quantizer: SNAC's factorized codebooks and EMA codebooks.

Each level average-pools the residual by its stride (coarse levels run at lower frame
rates), optionally projects it to a low-dimensional space, picks the nearest code, projects
back and repeat-upsamples. Levels act on the residual left by the previous ones.
Latents are `[batch, time, channels]`; codes are int32 `[batch, time // stride]`.

The same quantizer works on n-D latents `[batch, *spatial, channels]` (images
`[batch, height, width, channels]`, video `[batch, frames, height, width, channels]`): a
level's stride is then a tuple with one entry per spatial axis (an int means the same
stride on every axis), pooling is a mean over `stride_1 x stride_2 x ...` blocks, codes are
int32 `[batch, *(spatial // stride)]`, and upsampling repeats each code over its block.
Inside a level the pooled positions are flattened into one axis, so codebooks, EMA
statistics, k-means, dead-code restarts, dropout and sharding behave exactly as in 1-D.

Two codebook kinds (`QuantizerConfig.kind`):

- `"factorized"`: SNAC/DAC. Codes are looked up by cosine similarity (L2-normalised
  vectors) in a low-dimensional space; the codebook is a parameter trained by the codebook
  loss. Exact parity with the reference SNAC; the `params` tree is SNAC's.
- `"ema"`: SoundStream/EnCodec. Euclidean nearest code; the codebook is not a parameter but
  state in the `"codebook"` variable collection, updated in training by exponential moving
  averages of assignment counts and assigned-vector sums, initialised by k-means(++) on the
  first training batch, with dead codes restarted from batch vectors. Only the commitment
  loss is trained. Works with the SNAC projection (`use_projection=True`) or on the latent
  directly.

Every statistic (EMA sums, k-means, restart sampling, health metrics) is a plain `jnp`
reduction over the whole `[batch, time]` array. Under `jax.jit` with the batch sharded over
devices, XLA therefore computes global-batch statistics and every device ends with the same
codebook -- there is no per-device code path that could drift (EnCodec's buffer-sync bug).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from codec_jax.config import bits_per_frame  # noqa: F401 (re-exported: RVQ users' bit budget)
from codec_jax.nn.layers import WNConv1d

Array = jax.Array
Dtype = Any

KINDS = ("factorized", "ema")
CODEBOOK_COLLECTION = "codebook"  # variable collection holding the EMA codebook state
RNG_STREAM = "quantizer"  # rng stream for quantizer dropout, k-means++ and code restarts
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
    """How the residual quantizer learns its codebooks. Frozen and hashable (a static jit arg).

    kind: `"factorized"` (SNAC/DAC, gradient-trained, needs the projection) or `"ema"`.
    ema_decay: EMA decay of the assignment counts and assigned-vector sums.
    ema_eps: Laplace smoothing of the counts, so that a code with no assignments never
        divides by zero.
    dead_code_threshold: a code whose EMA count is below this is dead. The EMA count tracks
        the number of vectors assigned to the code per training batch, so keep this well
        below `batch * frames / codebook_size`.
    restart_dead_codes: replace dead codes by vectors drawn uniformly from the current batch.
    kmeans_init: run k-means++ seeding and `kmeans_iters` Lloyd iterations on the first
        training batch (per level, on that level's residual) before the first EMA update.
    use_projection: ema only: quantize in the `codebook_dim` space of SNAC's 1x1 in/out
        projections (trained by gradient), or quantize the latent directly (no parameters).
    dropout_prob: quantizer dropout in training. Each example, independently with this
        probability, uses `n ~ Uniform{1..N}` levels, otherwise all N (the `n_levels` given
        to the call). SoundStream is `1.0`; DAC's `quantizer_dropout=0.5` is `0.5` drawn per
        example rather than for a fixed slice of the batch. Inference never drops.
    codebook_sizes: per-level codebook sizes (coarse first), overriding the single size.
    detach_residual: the next level sees `residual - stop_gradient(level output)`, so each
        level's commitment loss is a function of the encoder output alone (EnCodec #25).
        `False` keeps DAC's gradient path through the previous levels' projections
        (factorized and projected ema only; unprojected levels always detach, since their
        straight-through output would otherwise cancel the residual's gradient).
    """

    kind: str = "factorized"
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    dead_code_threshold: float = 2.0
    restart_dead_codes: bool = True
    kmeans_init: bool = True
    kmeans_iters: int = 10
    use_projection: bool = True
    dropout_prob: float = 0.0
    codebook_sizes: Optional[tuple[int, ...]] = None
    detach_residual: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"QuantizerConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "factorized" and not self.use_projection:
            raise ValueError("the factorized (SNAC) codebook always projects; use kind='ema' "
                             "to quantize the latent directly")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.ema_eps <= 0:
            raise ValueError(f"ema_eps must be > 0, got {self.ema_eps}")
        if self.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {self.dead_code_threshold}")
        if self.kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {self.kmeans_iters}")
        if not 0.0 <= self.dropout_prob <= 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1], got {self.dropout_prob}")
        if self.codebook_sizes is not None:
            sizes = tuple(int(s) for s in self.codebook_sizes)
            if not sizes or any(s < 1 for s in sizes):
                raise ValueError(f"codebook_sizes must be positive ints, got {self.codebook_sizes}")
            object.__setattr__(self, "codebook_sizes", sizes)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "QuantizerConfig":
        """From a dict of field names (a training config's `quantizer` section, a saved
        codec's `quantizer.json`); unknown names are an error, lists become tuples."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown quantizer options {unknown}; QuantizerConfig has {sorted(fields)}")
        values = dict(values)
        if values.get("codebook_sizes") is not None:
            values["codebook_sizes"] = tuple(int(x) for x in values["codebook_sizes"])
        return cls(**values)

    def level_codebook_sizes(self, n_levels: int, default_size: int) -> tuple[int, ...]:
        """Codebook size of each of `n_levels` levels (coarse first)."""
        if self.codebook_sizes is None:
            return (int(default_size),) * n_levels
        if len(self.codebook_sizes) != n_levels:
            raise ValueError(f"codebook_sizes has {len(self.codebook_sizes)} entries for "
                             f"{n_levels} quantizer levels")
        return self.codebook_sizes

    @property
    def projects(self) -> bool:
        return self.kind == "factorized" or self.use_projection


# ---- bitrate -------------------------------------------------------------------------------

def bitrate(config, n_levels: Optional[int] = None,
            quantizer: Optional[QuantizerConfig] = None) -> float:
    """Bits per second of a `SNACConfig` using its first `n_levels` levels (all by default),
    with `quantizer.codebook_sizes` if given (`SNACConfig.bitrate` with this quantizer's
    per-level sizes). SNAC's presets give 984.4 (24 kHz), 1875.0 (32 kHz) and 2583.98
    (44.1 kHz) bit/s: the published 0.98, 1.9 and 2.6 kbps. A `Codec`'s bitrate is
    `bitrate(codec.config, quantizer=codec.quantizer)`."""
    quantizer = QuantizerConfig() if quantizer is None else quantizer
    sizes = quantizer.level_codebook_sizes(config.n_levels, config.codebook_size)
    return config.bitrate(n_levels, codebook_sizes=sizes)


# ---- pure codebook functions (all global reductions) ----------------------------------------

def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
    """`x / max(||x||, eps)`, as `torch.nn.functional.normalize`."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def nearest_code(latents: Array, codebook: Array) -> Array:
    """Index of the nearest L2-normalised code for each latent (factorized kind).

    latents `[..., dim]`, codebook `[codebook_size, dim]` -> int32 `[...]`. The distance is
    written as SNAC writes it (|e|^2 - 2 e.c + |c|^2 on normalised vectors) in float32 at
    full matmul precision, so that near-ties break as the reference breaks them.
    """
    e = l2_normalize(latents.astype(jnp.float32))
    c = l2_normalize(codebook.astype(jnp.float32))
    dist = (
        jnp.sum(jnp.square(e), axis=-1, keepdims=True)
        - 2.0 * jnp.einsum("...d,kd->...k", e, c, precision=_HIGHEST)
        + jnp.sum(jnp.square(c), axis=-1)
    )
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def nearest_code_euclidean(latents: Array, codebook: Array) -> Array:
    """Index of the Euclidean-nearest code (ema kind): latents `[..., dim]`, codebook
    `[codebook_size, dim]` -> int32 `[...]`. `|x|^2` is dropped: it does not change the argmin."""
    x = latents.astype(jnp.float32)
    c = codebook.astype(jnp.float32)
    dist = jnp.sum(jnp.square(c), axis=-1) - 2.0 * jnp.einsum("...d,kd->...k", x, c,
                                                              precision=_HIGHEST)
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def code_counts(codes: Array, codebook_size: int) -> Array:
    """Assignments per code over every axis of `codes` -> float32 `[codebook_size]`.

    A one-hot sum rather than a scatter-add: a reduction over a sharded axis is something
    XLA always turns into a cross-device sum.
    """
    return jnp.sum(jax.nn.one_hot(codes.reshape(-1), codebook_size, dtype=jnp.float32), axis=0)


def _assigned_sums(x: Array, codes: Array, codebook_size: int) -> tuple[Array, Array]:
    """x `[n, dim]`, codes `[n]` -> (counts `[k]`, sum of the vectors assigned to each code `[k, dim]`)."""
    onehot = jax.nn.one_hot(codes, codebook_size, dtype=jnp.float32)
    sums = jnp.einsum("nk,nd->kd", onehot, x.astype(jnp.float32), precision=_HIGHEST)
    return jnp.sum(onehot, axis=0), sums


def code_health(codes: Array, codebook_size: int) -> tuple[Array, Array]:
    """(perplexity, fraction of codes used) of the codes in a batch, float32 scalars.

    Perplexity is `exp(entropy)` of the empirical code distribution: `codebook_size` when
    codes are used uniformly, 1 when everything maps to one code.
    """
    counts = code_counts(codes, codebook_size)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy), jnp.mean((counts > 0).astype(jnp.float32))


def ema_update(cluster_size: Array, embed_sum: Array, x: Array, codes: Array, *,
               decay: float, eps: float) -> tuple[Array, Array, Array]:
    """One EMA codebook step.

    cluster_size `[k]`, embed_sum `[k, dim]` (EMA of counts and of assigned-vector sums),
    x `[n, dim]` with its codes `[n]` -> new (cluster_size, embed_sum, embedding `[k, dim]`).
    The embedding is `embed_sum / counts` with Laplace-smoothed counts
    `(c + eps) / (sum(c) + k * eps) * sum(c)`, which keeps the total mass and never divides
    by zero.
    """
    k = cluster_size.shape[0]
    counts, sums = _assigned_sums(x, codes, k)
    cluster_size = decay * cluster_size + (1.0 - decay) * counts
    embed_sum = decay * embed_sum + (1.0 - decay) * sums
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + eps) / (total + k * eps) * total
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def kmeans(x: Array, k: int, key: Array, iters: int) -> tuple[Array, Array]:
    """k-means++ seeding then `iters` Lloyd iterations. x `[n, dim]` -> (centers `[k, dim]`,
    counts `[k]` of the final assignment).

    Seeding draws each new center with probability proportional to the squared distance to
    the nearest center so far (uniformly if every point already coincides with a center).
    A center that loses all its points keeps its position (dead-code restart deals with it).
    """
    x = x.astype(jnp.float32)
    n, dim = x.shape

    def sq_dist(c):  # [n]
        return jnp.sum(jnp.square(x - c), axis=-1)

    key0, key_seed = jax.random.split(key)
    first = x[jax.random.randint(key0, (), 0, n)]
    centers = jnp.zeros((k, dim), jnp.float32).at[0].set(first)

    def seed(i, carry):
        centers, min_d = carry
        logits = jnp.where(jnp.sum(min_d) > 0, jnp.log(min_d), 0.0)
        c = x[jax.random.categorical(jax.random.fold_in(key_seed, i), logits)]
        return centers.at[i].set(c), jnp.minimum(min_d, sq_dist(c))

    centers, _ = jax.lax.fori_loop(1, k, seed, (centers, sq_dist(first)))

    def lloyd(_, centers):
        counts, sums = _assigned_sums(x, nearest_code_euclidean(x, centers), k)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centers)

    centers = jax.lax.fori_loop(0, iters, lloyd, centers)
    counts, _ = _assigned_sums(x, nearest_code_euclidean(x, centers), k)
    return centers, counts


def restart_dead_codes(embedding: Array, cluster_size: Array, embed_sum: Array, x: Array,
                       key: Array, threshold: float) -> tuple[Array, Array, Array, Array]:
    """Replace codes whose EMA count is below `threshold` by vectors of the batch.

    embedding `[k, dim]`, cluster_size `[k]`, embed_sum `[k, dim]`, x `[n, dim]` -> the three
    updated arrays and the dead mask `[k]` (before restart). Replacements are drawn uniformly
    without replacement (with replacement if `n < k`). A restarted code gets EMA count
    `threshold`: it survives the next step only if it wins assignments.
    """
    k, n = embedding.shape[0], x.shape[0]
    dead = cluster_size < threshold
    idx = jax.random.choice(key, n, (k,), replace=n < k)
    fresh = x[idx].astype(jnp.float32)
    new_size = jnp.where(dead, jnp.float32(threshold), cluster_size)
    embedding = jnp.where(dead[:, None], fresh, embedding)
    embed_sum = jnp.where(dead[:, None], fresh * new_size[:, None], embed_sum)
    return embedding, new_size, embed_sum, dead


def sample_levels_used(key: Array, batch: int, n_levels: int, dropout_prob: float) -> Array:
    """Quantizer dropout: int32 `[batch]` level counts. Each example, with probability
    `dropout_prob`, draws `Uniform{1..n_levels}`; otherwise uses all `n_levels`."""
    k_n, k_drop = jax.random.split(key)
    random_n = jax.random.randint(k_n, (batch,), 1, n_levels + 1, dtype=jnp.int32)
    drop = jax.random.bernoulli(k_drop, dropout_prob, (batch,))
    return jnp.where(drop, random_n, jnp.int32(n_levels))


def axis_strides(stride: int | Sequence[int], n_axes: int) -> tuple[int, ...]:
    """A level's stride per spatial axis: an int applies to every axis."""
    if isinstance(stride, int):
        return (int(stride),) * n_axes
    stride = tuple(int(s) for s in stride)
    if len(stride) != n_axes:
        raise ValueError(f"stride {stride} has {len(stride)} axes, latents have {n_axes} spatial axes")
    return stride


def avg_pool(x: Array, stride: int | Sequence[int]) -> Array:
    """Mean over non-overlapping blocks: `[b, *spatial, c]` -> `[b, *(spatial // stride), c]`."""
    strides = axis_strides(stride, x.ndim - 2)
    if all(s == 1 for s in strides):
        return x
    frames = tuple(n // s for n, s in zip(x.shape[1:-1], strides))
    x = x[(slice(None),) + tuple(slice(0, f * s) for f, s in zip(frames, strides))]
    split = (x.shape[0],) + tuple(d for f, s in zip(frames, strides) for d in (f, s)) + (x.shape[-1],)
    return x.reshape(split).mean(axis=tuple(2 + 2 * i for i in range(len(strides))))


def repeat_upsample(x: Array, stride: int | Sequence[int]) -> Array:
    """Each position repeated over its block: `[b, *frames, c]` -> `[b, *(frames * stride), c]`."""
    for axis, s in enumerate(axis_strides(stride, x.ndim - 2)):
        if s > 1:
            x = jnp.repeat(x, s, axis=1 + axis)
    return x


# ---- modules --------------------------------------------------------------------------------

class VQLevel(nn.Module):
    """One quantizer level.

    factorized: params `in_proj` (WN 1x1 conv `dim -> codebook_dim`), `out_proj`
    (`codebook_dim -> dim`), `codebook` `[codebook_size, codebook_dim]` (SNAC's layout).
    ema: params `in_proj`/`out_proj` only if `config.use_projection`; collection `"codebook"`
    holds `embedding` `[codebook_size, d]`, `cluster_size` `[codebook_size]`, `embed_sum`
    `[codebook_size, d]` and the scalar bool `initialized`, where `d` is `codebook_dim` with
    the projection and `dim` without.
    """

    dim: int
    codebook_size: int
    codebook_dim: int
    stride: int | tuple[int, ...] = 1  # per spatial axis for n-D latents
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    config: QuantizerConfig = QuantizerConfig()

    @property
    def code_dim(self) -> int:
        return self.codebook_dim if self.config.projects else self.dim

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        if self.config.projects:
            self.in_proj = WNConv1d(self.codebook_dim, 1, **kw)
            self.out_proj = WNConv1d(self.dim, 1, **kw)
        shape = (self.codebook_size, self.code_dim)
        if self.config.kind == "factorized":
            self.codebook = self.param("codebook", nn.initializers.normal(1.0), shape,
                                       self.param_dtype)
        else:
            # Float32 state whatever the compute dtype. Before the first EMA update the
            # statistics describe one pseudo-batch in which every code holds
            # max(threshold, 1) vectors at its initial position: codes are not dead on
            # arrival, and a code that never wins keeps its position rather than
            # collapsing towards zero.
            count0 = max(float(self.config.dead_code_threshold), 1.0)
            col = CODEBOOK_COLLECTION
            self.embedding = self.variable(
                col, "embedding",
                lambda: jax.random.normal(self.make_rng("params"), shape, jnp.float32))
            self.cluster_size = self.variable(
                col, "cluster_size", lambda: jnp.full(shape[:1], count0, jnp.float32))
            self.embed_sum = self.variable(col, "embed_sum",
                                           lambda: self.embedding.value * count0)
            self.initialized = self.variable(col, "initialized", lambda: jnp.array(False))

    def __call__(self, z: Array, *, train: bool = False) -> dict[str, Array]:
        """z `[batch, time, dim]` -> dict with `z_q` `[batch, frames*stride, dim]` (straight-
        through: its gradient w.r.t. the projected latent is the identity), `codes`
        `[batch, frames]`, `z_e` `[batch, frames, d]` (what is quantized), per-example
        `commitment_loss` and `codebook_loss` `[batch]`, and scalar health metrics
        `perplexity`, `usage`, `dead_codes` over the whole batch.

        With `train=True` (and not while initialising) the ema kind updates its state in the
        `"codebook"` collection, which must then be mutable.
        """
        z_pooled = avg_pool(z, self.stride)
        grid = z_pooled.shape[1:-1]  # pooled spatial shape; flattened to one axis inside
        z_pooled = z_pooled.reshape(z.shape[0], -1, z.shape[-1])
        z_e = (self.in_proj(z_pooled) if self.config.projects else z_pooled).astype(jnp.float32)
        if self.config.kind == "factorized":
            codes = nearest_code(z_e, self.codebook)
            z_code = jnp.take(self.codebook.astype(jnp.float32), codes, axis=0)
            # DAC's losses on the un-normalised vectors: the codebook moves towards the
            # encoder output, the encoder commits to the codebook.
            codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z_e) - z_code), axis=(1, 2))
            dead_codes = jnp.int32(0)
        else:
            codes, z_code, dead_codes = self._ema_quantize(z_e, train)
            codebook_loss = jnp.zeros(z_e.shape[:1], jnp.float32)
        commitment = jnp.mean(jnp.square(z_e - jax.lax.stop_gradient(z_code)), axis=(1, 2))
        z_st = z_e + jax.lax.stop_gradient(z_code - z_e)  # straight-through estimator
        out = self.out_proj(z_st.astype(self.dtype)) if self.config.projects else z_st
        perplexity, usage = code_health(codes, self.codebook_size)
        out = out.astype(self.dtype).reshape((z.shape[0],) + grid + (out.shape[-1],))
        codes = codes.reshape((z.shape[0],) + grid)
        z_e = z_e.reshape((z.shape[0],) + grid + (z_e.shape[-1],))
        return dict(z_q=repeat_upsample(out, self.stride), codes=codes, z_e=z_e,
                    commitment_loss=commitment, codebook_loss=codebook_loss,
                    perplexity=perplexity, usage=usage, dead_codes=dead_codes)

    def _ema_quantize(self, z_e: Array, train: bool) -> tuple[Array, Array, Array]:
        """Nearest codes of z_e `[b, f, d]` under the EMA codebook; in training, first k-means
        init (once) and afterwards the EMA update and dead-code restart.
        -> (codes `[b, f]`, code vectors `[b, f, d]`, dead-code count)."""
        cfg = self.config
        if not self.is_initializing() and not self.has_variable(CODEBOOK_COLLECTION, "embedding"):
            raise ValueError(f"{self.name}: ema quantizer needs the {CODEBOOK_COLLECTION!r} "
                             "variable collection: apply({'params': ..., 'codebook': ...}, ...)")
        update = train and not self.is_initializing()
        if update and not self.is_mutable_collection(CODEBOOK_COLLECTION):
            raise ValueError(f"train=True updates the EMA codebooks: pass "
                             f"mutable=[{CODEBOOK_COLLECTION!r}] to apply")
        if update and not self.has_rng(RNG_STREAM):
            raise ValueError(f"train=True with ema codebooks needs a {RNG_STREAM!r} rng "
                             f"(k-means++ and dead-code restart): rngs={{'{RNG_STREAM}': key}}")
        k = self.codebook_size
        embedding = self.embedding.value
        cluster_size = self.cluster_size.value
        embed_sum = self.embed_sum.value
        # Statistics never carry gradient: the codebook is learnt by EMA, not by the optimizer.
        x = jax.lax.stop_gradient(z_e).reshape(-1, z_e.shape[-1])
        if update:
            key_init, key_restart = jax.random.split(self.make_rng(RNG_STREAM))
            if cfg.kmeans_init:
                def from_kmeans():
                    centers, counts = kmeans(x, k, key_init, cfg.kmeans_iters)
                    return centers, counts, centers * counts[:, None]

                # cond rather than where: k-means runs once, not on every step.
                embedding, cluster_size, embed_sum = jax.lax.cond(
                    self.initialized.value, lambda: (embedding, cluster_size, embed_sum),
                    from_kmeans)
        codes = nearest_code_euclidean(z_e, embedding)
        z_code = jnp.take(embedding, codes, axis=0)
        if not update:
            return codes, z_code, jnp.sum(cluster_size < cfg.dead_code_threshold).astype(jnp.int32)
        cluster_size, embed_sum, new_embedding = ema_update(
            cluster_size, embed_sum, x, codes.reshape(-1), decay=cfg.ema_decay, eps=cfg.ema_eps)
        if cfg.restart_dead_codes:
            new_embedding, cluster_size, embed_sum, dead = restart_dead_codes(
                new_embedding, cluster_size, embed_sum, x, key_restart, cfg.dead_code_threshold)
        else:
            dead = cluster_size < cfg.dead_code_threshold
        self.embedding.value = new_embedding
        self.cluster_size.value = cluster_size
        self.embed_sum.value = embed_sum
        self.initialized.value = jnp.array(True)
        return codes, z_code, jnp.sum(dead).astype(jnp.int32)

    def decode(self, codes: Array) -> Array:
        """codes `[batch, *frames]` -> `[batch, *(frames * stride), dim]`."""
        table = self.codebook if self.config.kind == "factorized" else self.embedding.value
        z_code = jnp.take(table, codes.reshape(codes.shape[0], -1), axis=0).astype(self.dtype)
        out = self.out_proj(z_code) if self.config.projects else z_code
        return repeat_upsample(out.reshape(codes.shape + (out.shape[-1],)), self.stride)


class ResidualVQ(nn.Module):
    """Levels applied in turn to the residual the previous ones leave (coarse first).

    Works on any `[batch, time, dim]` latents, and on n-D latents `[batch, *spatial, dim]`
    with per-axis strides (see the module docstring); each spatial axis must be a multiple
    of every stride used on it. `codebook_size` is the size of every level unless `config.codebook_sizes` is set;
    `codebook_dim` is unused by unprojected ema levels.
    """

    dim: int
    codebook_size: int
    codebook_dim: int
    strides: Sequence[int | tuple[int, ...]]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    config: QuantizerConfig = QuantizerConfig()

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return self.config.level_codebook_sizes(len(self.strides), self.codebook_size)

    def setup(self):
        self.levels = [
            VQLevel(self.dim, size, self.codebook_dim, stride, dtype=self.dtype,
                    param_dtype=self.param_dtype, precision=self.precision, config=self.config,
                    name=f"level_{i}")
            for i, (stride, size) in enumerate(zip(self.strides, self.codebook_sizes))
        ]

    def __call__(self, z: Array, n_levels: Optional[int] = None, *,
                 train: bool = False) -> dict[str, Any]:
        """Quantize z `[batch, time, dim]` with the first `n_levels` levels (all by default).

        Returns a dict with
          `z_q` `[batch, time, dim]`: sum of the used levels' outputs, straight-through;
          `codes`: list of int32 `[batch, time // stride_l]` per computed level, coarse first
            (`[batch, *(spatial // stride_l)]` for n-D latents);
          `commitment_loss`, `codebook_loss`: lists of `[batch]` per level, zero where quantizer
            dropout left the level out for that example (`codebook_loss` is zero for ema);
          `quantizer_metrics`: `perplexity`, `usage` (float32 `[levels]`) and `dead_codes`
            (int32 `[levels]`): batch-wide code health per level;
          `levels_used`: int32 `[batch]`, levels each example used (after dropout).

        `train=True` draws quantizer dropout (if `config.dropout_prob > 0`) from the
        `"quantizer"` rng and updates ema codebooks; at inference `n_levels` picks the bitrate.
        """
        total = len(self.strides)
        n_levels = total if n_levels is None else int(n_levels)
        if not 1 <= n_levels <= total:
            raise ValueError(f"n_levels must be in [1, {total}], got {n_levels}")
        if z.ndim < 3 or z.shape[-1] != self.dim:
            raise ValueError(f"expected latents [batch, time, {self.dim}] or "
                             f"[batch, *spatial, {self.dim}], got {z.shape}")
        active = total if self.is_initializing() else n_levels
        per_axis = [axis_strides(s, z.ndim - 2) for s in self.strides[:active]]
        for axis, size in enumerate(z.shape[1:-1]):
            multiple = math.lcm(*(s[axis] for s in per_axis))
            if size % multiple:
                raise ValueError(f"spatial axis {axis} ({size}) must be a multiple of {multiple}, "
                                 f"the lcm of the strides {tuple(self.strides[:active])} on it")
        batch = z.shape[0]
        dropout = train and self.config.dropout_prob > 0 and not self.is_initializing()
        if dropout:
            levels_used = sample_levels_used(self.make_rng(RNG_STREAM), batch, n_levels,
                                             self.config.dropout_prob)
        else:
            levels_used = jnp.full((batch,), n_levels, jnp.int32)
        detach = self.config.detach_residual or not self.config.projects
        z_q = jnp.zeros_like(z, dtype=self.dtype)
        residual = z
        codes, commitment, codebook, health = [], [], [], []
        for i, level in enumerate(self.levels[:n_levels]):
            out = level(residual, train=train)
            keep = (i < levels_used)  # [batch]: quantizer dropout
            keep_b = keep.reshape((batch,) + (1,) * (z.ndim - 1))
            z_q = z_q + jnp.where(keep_b, out["z_q"], 0).astype(self.dtype)
            # Every example's residual continues: a level's codebook statistics are valid
            # whichever examples use it, and only the *outputs* are dropped.
            residual = residual - (jax.lax.stop_gradient(out["z_q"]) if detach else out["z_q"])
            codes.append(out["codes"])
            commitment.append(jnp.where(keep, out["commitment_loss"], 0.0))
            codebook.append(jnp.where(keep, out["codebook_loss"], 0.0))
            health.append((out["perplexity"], out["usage"], out["dead_codes"]))
        if not self.config.projects:
            # Whole-quantizer straight-through: each unprojected level's own estimator passes
            # the gradient through pool+upsample, and summing N of them would scale it.
            z_q = z + jax.lax.stop_gradient(z_q - z)
        if self.is_initializing():
            for level in self.levels[n_levels:]:
                level(residual)
        perplexity, usage, dead = zip(*health)
        metrics = dict(perplexity=jnp.stack(perplexity), usage=jnp.stack(usage),
                       dead_codes=jnp.stack(dead))
        return dict(z_q=z_q, codes=codes, commitment_loss=commitment, codebook_loss=codebook,
                    quantizer_metrics=metrics, levels_used=levels_used)

    def decode(self, codes: Sequence[Array]) -> Array:
        """codes: list of `[batch, frames_level]` (n-D: `[batch, *frames_level]`), coarse first
        (a prefix of the levels is fine) -> `[batch, frames_finest*stride_last, dim]`."""
        if not 1 <= len(codes) <= len(self.strides):
            raise ValueError(f"expected 1..{len(self.strides)} code levels, got {len(codes)}")
        z_q = None
        for level, level_codes in zip(self.levels, codes):
            part = level.decode(level_codes)
            z_q = part if z_q is None else z_q + part
        return z_q
