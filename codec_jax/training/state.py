"""The training state pytree and its (sharded) creation.

Everything a train step reads or writes lives in one `TrainState`, so that the step is
a pure function `state, batch -> state, metrics`, the whole state is donated to it, and
a checkpoint of the state (plus the data iterator position) is a complete resume point.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from codec_jax.training import sharding as shard_lib


@flax.struct.dataclass
class TrainState:
    """One pytree with all the state of GAN codec training.

    step:             int32 `[]`, number of train steps run (skipped ones included).
    rng:              uint32 `[2]`, raw PRNG key data; step keys are
                      `fold_in(rng, step)`, so a resumed run draws the same noise.
    gen_params:       generator (`SNAC`) `params` collection, float32.
    disc_params:      discriminator `params` collection, float32.
    gen_opt_state:    optax state of the generator optimizer (sharded like the params).
    disc_opt_state:   optax state of the discriminator optimizer.
    codebook:         the generator's non-optimised `codebook` collection (EMA codebook
                      statistics); `{}` for a quantizer trained by gradients.
    balancer:         `training.balancer.BalancerState` of the EnCodec loss balancer, or None.
    skipped_steps:    int32 `[]`, steps whose update was dropped for non-finite values.
    consecutive_skips: int32 `[]`, length of the current run of skipped steps.
    """

    step: jax.Array
    rng: jax.Array
    gen_params: Any
    disc_params: Any
    gen_opt_state: Any
    disc_opt_state: Any
    codebook: Any
    balancer: Any
    skipped_steps: jax.Array
    consecutive_skips: jax.Array


def rng_from_seed(seed: int) -> jax.Array:
    """uint32 `[2]` key data for `seed` (stored raw so checkpoints hold a plain array)."""
    return jax.random.key_data(jax.random.key(int(seed), impl="threefry2x32"))


def step_key(state_rng: jax.Array, step: jax.Array) -> jax.Array:
    """The typed PRNG key of one step: `fold_in(rng, step)`."""
    return jax.random.fold_in(jax.random.wrap_key_data(state_rng, impl="threefry2x32"), step)


def make_init_fn(
    *,
    init_generator: Callable[[jax.Array], dict[str, Any]],
    init_discriminator: Callable[[jax.Array], dict[str, Any]],
    gen_tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    init_balancer: Optional[Callable[[], Any]] = None,
) -> Callable[..., TrainState]:
    """Returns `init(seed_rng, gen_params=None) -> TrainState`, a pure function to jit.

    `init_generator(key)` / `init_discriminator(key)` return flax variables dicts
    (`{"params": ..., ["codebook": ...]}`). When `gen_params` is given (fine-tuning from
    an imported checkpoint) it replaces the generator's fresh parameters; the fresh ones
    are then dead code that XLA removes.
    """

    def init(seed_rng: jax.Array, gen_params: Optional[Any] = None) -> TrainState:
        key = jax.random.wrap_key_data(seed_rng, impl="threefry2x32")
        k_gen, k_disc = jax.random.split(jax.random.fold_in(key, 0x1417))
        gen_vars = init_generator(k_gen)
        disc_vars = init_discriminator(k_disc)
        params = gen_vars["params"] if gen_params is None else gen_params
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            rng=seed_rng,
            gen_params=params,
            disc_params=disc_vars["params"],
            gen_opt_state=gen_tx.init(params),
            disc_opt_state=disc_tx.init(disc_vars["params"]),
            codebook=gen_vars.get("codebook", {}),
            balancer=None if init_balancer is None else init_balancer(),
            skipped_steps=jnp.zeros((), jnp.int32),
            consecutive_skips=jnp.zeros((), jnp.int32),
        )

    return init


def state_shardings(abstract_state: TrainState, mesh: Mesh, min_size: int) -> TrainState:
    """NamedShardings for every leaf of a `TrainState` (FSDP rule; see `codec_jax.training.sharding`)."""
    return shard_lib.tree_shardings(abstract_state, mesh, min_size=min_size)


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their target sharding: a restore target for orbax."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def create_sharded_state(init_fn: Callable[..., TrainState], seed: int, mesh: Mesh,
                         min_size: int, gen_params: Optional[Any] = None,
                         compiler_options: Optional[dict[str, Any]] = None
                         ) -> tuple[TrainState, TrainState]:
    """Create the state directly in its sharded layout: `(state, shardings)`.

    The state's shapes come from `jax.eval_shape`, its shardings from the FSDP rule, and
    `jit(init, out_shardings=...)` materialises each shard on its device, so no device
    ever holds a full unsharded copy of a large tensor.
    `gen_params` (host arrays, optional) are placed with the generator parameters'
    shardings first, one shard at a time. `compiler_options` (XLA debug options, e.g.
    `{"xla_backend_optimization_level": 0}`) are passed to the initialiser's compile.
    """
    seed_rng = rng_from_seed(seed)
    abstract = jax.eval_shape(init_fn, seed_rng)
    shardings = state_shardings(abstract, mesh, min_size)
    replicated = shard_lib.replicated(mesh)
    if gen_params is None:
        init = jax.jit(init_fn, in_shardings=(replicated,), out_shardings=shardings)
        args = (seed_rng,)
    else:
        gen_params = place_on_mesh(gen_params, abstract.gen_params, shardings.gen_params)
        init = jax.jit(init_fn, in_shardings=(replicated, shardings.gen_params),
                       out_shardings=shardings)
        args = (seed_rng, gen_params)
    if compiler_options:
        return init.lower(*args).compile(compiler_options=compiler_options)(*args), shardings
    return init(*args), shardings


def place_on_mesh(host_tree: Any, abstract_tree: Any, shardings: Any) -> Any:
    """Host (numpy) arrays -> global arrays with `shardings`, checking shapes against
    `abstract_tree`. Every process passes the full value; each device takes its slice."""
    host_leaves, treedef = jax.tree_util.tree_flatten(host_tree)
    abstract_leaves, abstract_def = jax.tree_util.tree_flatten(abstract_tree)
    if treedef != abstract_def:
        raise ValueError(
            "imported generator parameters do not match the model's parameter tree:\n"
            f"  imported: {treedef}\n  model:    {abstract_def}")
    out = []
    flat_paths = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    for (path, a), value, s in zip(flat_paths, host_leaves, jax.tree_util.tree_leaves(shardings)):
        value = np.asarray(value, dtype=a.dtype)
        if value.shape != a.shape:
            raise ValueError(f"imported parameter {jax.tree_util.keystr(path)} has shape "
                             f"{value.shape}, the model expects {a.shape}")
        out.append(jax.make_array_from_callback(a.shape, s, lambda idx, v=value: v[idx]))
    return jax.tree_util.tree_unflatten(treedef, out)


def param_count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
