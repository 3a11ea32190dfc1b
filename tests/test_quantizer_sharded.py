"""Sharded correctness of the EMA codebooks on 8 fake CPU devices.

The check runs in a subprocess: `--xla_force_host_platform_device_count` only takes effect
before JAX initialises its backend, and the other test files in the same pytest process
must keep seeing one device. Run this file directly (`python tests/test_quantizer_sharded.py`
with the flag set) to see the comparison.
"""

from __future__ import annotations

import pytest

import os
import subprocess
import sys

N_DEVICES = 8
MESHES = {"data": ((8,), ("data",)), "data x fsdp": ((4, 2), ("data", "fsdp"))}


@pytest.mark.long
def test_sharded_ema_update_equals_single_device_update():
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={N_DEVICES}".strip())
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=900)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    for name in MESHES:
        assert f"mesh {name}: sharded == single-device" in proc.stdout, report
    assert "unsynced per-device statistics drift" in proc.stdout, report
    assert "ALL OK" in proc.stdout, report


def _run_check() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from codec_jax.nn.quantizer import QuantizerConfig, ResidualVQ, ema_update

    assert jax.device_count() == N_DEVICES, jax.devices()
    # Dropout, k-means init (step 0) and dead-code restarts (threshold 4 with ~8 vectors
    # per code at level 0) all run, so every rng-driven and statistics path is compared.
    cfg = QuantizerConfig(kind="ema", dropout_prob=1.0, dead_code_threshold=4.0, kmeans_iters=5)
    model = ResidualVQ(8, 16, 4, (2, 1), config=cfg)
    batches = [jax.random.normal(jax.random.key(10 + i), (16, 16, 8)) for i in range(3)]
    keys = [jax.random.key(100 + i) for i in range(3)]
    variables = model.init(jax.random.key(0), batches[0])

    def step(params, codebook, z, key):
        out, new = model.apply({"params": params, "codebook": codebook}, z, train=True,
                               rngs={"quantizer": key}, mutable=["codebook"])
        return out, new["codebook"]

    def run(fn, params, codebook):
        outs, states = [], []
        for z, key in zip(batches, keys):
            out, codebook = fn(params, codebook, z, key)
            outs.append(jax.device_get(out))
            states.append(codebook)
        return outs, states

    cpu0 = jax.devices()[0]
    on0 = lambda tree: jax.device_put(tree, cpu0)
    ref_outs, ref_states = run(jax.jit(step), on0(variables["params"]), on0(variables["codebook"]))
    ref_states = jax.device_get(ref_states)
    restarts = sum(int(np.sum(o["quantizer_metrics"]["dead_codes"])) for o in ref_outs[1:])
    assert restarts > 0, "the setup should exercise dead-code restart"

    for name, (shape, axes) in MESHES.items():
        mesh = Mesh(np.asarray(jax.devices()).reshape(shape), axes)
        batch_spec = NamedSharding(mesh, P(axes))  # batch split over every mesh axis
        fsdp = dict(zip(axes, shape)).get("fsdp", 1)

        def fsdp_spec(leaf):  # FSDP-style: first axis split over "fsdp" where it divides
            if fsdp > 1 and leaf.ndim and leaf.shape[0] % fsdp == 0:
                return NamedSharding(mesh, P("fsdp"))
            if fsdp > 1 and leaf.ndim > 1 and leaf.shape[1] % fsdp == 0:
                return NamedSharding(mesh, P(None, "fsdp"))
            return NamedSharding(mesh, P())

        p_spec = jax.tree_util.tree_map(fsdp_spec, variables["params"])
        cb_spec = jax.tree_util.tree_map(fsdp_spec, variables["codebook"])
        sharded = jax.jit(step, in_shardings=(p_spec, cb_spec, batch_spec, NamedSharding(mesh, P())),
                          out_shardings=(None, cb_spec))
        params = jax.device_put(variables["params"], p_spec)
        codebook = jax.device_put(variables["codebook"], cb_spec)
        outs, states = run(sharded, params, codebook)
        for i, (out, ref) in enumerate(zip(outs, ref_outs)):
            for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
                if np.issubdtype(np.asarray(b).dtype, np.integer):
                    np.testing.assert_array_equal(a, b, err_msg=f"{name} step {i}")
                else:
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{name} step {i}")
        for i, (state, ref) in enumerate(zip(states, ref_states)):
            for (path, leaf), want in zip(jax.tree_util.tree_leaves_with_path(state),
                                          jax.tree_util.tree_leaves(ref)):
                # Every device holds exactly its slice of the single-device state, so the
                # replicas along "data" agree with each other.
                for shard in leaf.addressable_shards:
                    np.testing.assert_allclose(
                        np.asarray(shard.data), np.asarray(want)[shard.index], rtol=1e-5,
                        atol=1e-5, err_msg=f"{name} step {i} {jax.tree_util.keystr(path)} on {shard.device}")
        print(f"mesh {name}: sharded == single-device over {len(batches)} steps "
              f"({restarts} restarts, k-means init, dropout)")

    # Control: EnCodec's bug, an EMA update on each device's local statistics only. The
    # devices end with different codebooks, none equal to the global update above.
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    level0 = ref_states[0]["level_0"]
    x = batches[1][:, ::2][..., :4].reshape(-1, 4)  # any [n, d] batch with its codes will do
    codes = jnp.argmin(jnp.sum((x[:, None] - level0["embedding"][None]) ** 2, -1), -1)

    def local(cs, es, x, codes):
        return ema_update(cs, es, x, codes, decay=0.99, eps=1e-5)[2][None]

    per_device = np.asarray(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                          out_specs=P("data"))(level0["cluster_size"], level0["embed_sum"],
                                                               x, codes))
    global_emb = np.asarray(ema_update(level0["cluster_size"], level0["embed_sum"], x, codes,
                                       decay=0.99, eps=1e-5)[2])
    spread = np.abs(per_device - per_device[:1]).max()
    assert spread > 1e-3, spread
    assert all(np.abs(d - global_emb).max() > 1e-4 for d in per_device)
    print(f"control: unsynced per-device statistics drift apart (max spread {spread:.3g})")
    print("ALL OK")


if __name__ == "__main__":
    _run_check()
