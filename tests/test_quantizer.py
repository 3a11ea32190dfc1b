"""Behaviour of the multi-scale residual quantizer: EMA codebooks, k-means init, dead-code
restart, straight-through gradients, commitment gradients, quantizer dropout, bitrate,
health metrics, and the SNAC wiring of the `"codebook"` collection."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from codec_jax.config import PRESETS, SNACConfig
from codec_jax.nn.snac import SNAC
from codec_jax.nn.quantizer import (
    QuantizerConfig,
    ResidualVQ,
    VQLevel,
    avg_pool,
    bitrate,
    bits_per_frame,
    code_health,
    kmeans,
    sample_levels_used,
)

EMA_PLAIN = QuantizerConfig(kind="ema", use_projection=False)
EMA_PROJ = QuantizerConfig(kind="ema")
FACTORIZED = QuantizerConfig()


def make_step(model):
    """Jitted training call: (params, codebook, z, key) -> (out, new codebook)."""

    @jax.jit
    def step(params, codebook, z, key):
        out, new = model.apply({"params": params, "codebook": codebook}, z, train=True,
                               rngs={"quantizer": key}, mutable=["codebook"])
        return out, new["codebook"]

    return step


def init(model, z, seed=0):
    v = model.init(jax.random.key(seed), z)
    return v.get("params", {}), v.get("codebook", {})


# ---- config, bitrate, dropout ----------------------------------------------------------------

def test_config_validation_and_hashable():
    with pytest.raises(ValueError, match="kind"):
        QuantizerConfig(kind="kmeans")
    with pytest.raises(ValueError, match="projects"):
        QuantizerConfig(kind="factorized", use_projection=False)
    with pytest.raises(ValueError, match="ema_decay"):
        QuantizerConfig(kind="ema", ema_decay=1.0)
    with pytest.raises(ValueError, match="dropout_prob"):
        QuantizerConfig(dropout_prob=1.5)
    cfg = QuantizerConfig(kind="ema", codebook_sizes=[16, 32])
    assert cfg.codebook_sizes == (16, 32) and hash(cfg) == hash(QuantizerConfig(kind="ema", codebook_sizes=(16, 32)))
    with pytest.raises(ValueError, match="2 entries for 3"):
        cfg.level_codebook_sizes(3, 64)


def test_quantizer_options_are_checked_in_one_place(tmp_path):
    # The training config section, a saved codec's quantizer.json and the dataclass all go
    # through QuantizerConfig.from_dict: unknown names and bad kinds give one clear error.
    import json

    import codec_jax
    from codec_jax.configs.tiny import get_config
    from codec_jax.training import builders

    assert QuantizerConfig.from_dict({"kind": "ema", "codebook_sizes": [8, 16, 32]}) == \
        QuantizerConfig(kind="ema", codebook_sizes=(8, 16, 32))
    with pytest.raises(ValueError, match=r"unknown quantizer options \['kmeans_iter'\]"):
        QuantizerConfig.from_dict({"kmeans_iter": 3})
    cfg = get_config()
    cfg.quantizer.kind = "kmeans"
    with pytest.raises(ValueError, match="kind must be one of"):
        builders.build_generator(cfg)
    tiny = PRESETS["tiny"]
    codec_jax.Codec(tiny, {"params": {}}).save(tmp_path)
    (tmp_path / "quantizer.json").write_text(json.dumps({"kind": "ema", "decay": 0.9}))
    with pytest.raises(ValueError, match=r"unknown quantizer options \['decay'\]"):
        codec_jax.load_pretrained(tmp_path)


def test_bitrate_reproduces_snac_published_figures():
    published = {"snac_24khz": 0.98, "snac_32khz": 1.9, "snac_44khz": 2.6}
    for name, kbps in published.items():
        config = PRESETS[name]
        assert round(bitrate(config) / 1000, 2 if kbps < 1 else 1) == kbps
        for n in range(1, config.n_levels + 1):
            assert bitrate(config, n) == pytest.approx(config.bitrate(n))
    c24 = PRESETS["snac_24khz"]
    # 24000 / 512 = 46.875 finest frames/s; the coarse level (stride 4) carries 12 bits per 4 frames.
    assert bitrate(c24, 1) == pytest.approx(46.875 / 4 * 12)
    sizes = QuantizerConfig(codebook_sizes=(256, 1024, 4096))
    assert bitrate(c24, quantizer=sizes) == pytest.approx(46.875 * (8 / 4 + 10 / 2 + 12))
    assert bits_per_frame((4, 2, 1), (256, 1024, 4096), 2) == pytest.approx(2 + 5)
    with pytest.raises(ValueError):
        bitrate(c24, 4)


def test_bitrate_with_per_level_codebook_sizes():
    c24 = PRESETS["snac_24khz"]
    sizes = (256, 1024, 4096)
    # 46.875 finest frames/s: 8 bits per 4 frames + 10 per 2 + 12 per frame.
    expected = 46.875 * (8 / 4 + 10 / 2 + 12)
    assert c24.bitrate(codebook_sizes=sizes) == pytest.approx(expected)
    assert c24.bitrate(1, codebook_sizes=sizes) == pytest.approx(46.875 * 2)
    assert bitrate(c24, quantizer=QuantizerConfig(codebook_sizes=sizes)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="2 codebook sizes for 3 strides"):
        c24.bitrate(codebook_sizes=(256, 1024))


@pytest.mark.slow
def test_cli_reports_the_bitrate_of_per_level_codebook_sizes(tmp_path, capsys):
    import soundfile as sf

    import codec_jax
    from codec_jax.cli import codec as codec_cli

    tiny = PRESETS["tiny"]
    quantizer = QuantizerConfig(kind="ema", codebook_sizes=(16, 32, 64))
    variables = codec_jax.init_variables(tiny, 0, quantizer=quantizer)
    codec_jax.Codec(tiny, variables, quantizer=quantizer).save(tmp_path / "codec")
    wav = tmp_path / "clip.wav"
    sf.write(wav, 0.1 * np.sin(np.arange(tiny.pad_multiple) * 0.05), tiny.sampling_rate)
    assert codec_cli.roundtrip_main([str(tmp_path / "codec"), str(wav), "-o", str(tmp_path / "out.wav")]) == 0
    # 16000 / 24 finest frames/s, log2 16 / 4 + log2 32 / 2 + log2 64 bits per frame: 6.33
    # kbps (the single size 64 would claim 7.00).
    assert "6.33 kbps" in capsys.readouterr().out


def test_dropout_draws_level_counts_uniformly():
    n, batch = 4, 40_000
    draws = np.asarray(sample_levels_used(jax.random.key(0), batch, n, 1.0))
    counts = np.bincount(draws, minlength=n + 1)
    assert counts[0] == 0 and counts.sum() == batch
    assert stats.chisquare(counts[1:]).pvalue > 1e-3
    # dropout_prob=0.5: half the examples draw uniformly, the rest use all levels.
    draws = np.asarray(sample_levels_used(jax.random.key(1), batch, n, 0.5))
    freq = np.bincount(draws, minlength=n + 1)[1:] / batch
    np.testing.assert_allclose(freq, [0.125, 0.125, 0.125, 0.625], atol=0.01)
    assert np.all(np.asarray(sample_levels_used(jax.random.key(2), 64, n, 0.0)) == n)


@pytest.mark.slow
def test_dropout_keeps_a_prefix_of_levels_per_example():
    """In training each example's z_q is the sum of its first `levels_used` levels, and the
    losses of the dropped levels are zero; at inference every example uses n_levels."""
    cfg = QuantizerConfig(dropout_prob=1.0)
    model = ResidualVQ(8, 16, 4, (4, 2, 1), config=cfg)
    z = jax.random.normal(jax.random.key(0), (64, 16, 8))
    params, cb = init(model, z)
    out, _ = make_step(model)(params, cb, z, jax.random.key(3))
    used = np.asarray(out["levels_used"])
    assert set(used) == {1, 2, 3}
    infer = jax.jit(lambda z, n: model.apply({"params": params}, z, n_levels=n), static_argnums=1)
    for n in (1, 2, 3):
        ref = infer(z, n)
        rows = used == n
        np.testing.assert_allclose(np.asarray(out["z_q"])[rows], np.asarray(ref["z_q"])[rows], atol=1e-6)
        assert np.all(np.asarray(ref["levels_used"]) == n)
    for level, (commit, book) in enumerate(zip(out["commitment_loss"], out["codebook_loss"])):
        dropped = used <= level
        assert np.all(np.asarray(commit)[dropped] == 0) and np.all(np.asarray(commit)[~dropped] > 0)
        assert np.all(np.asarray(book)[dropped] == 0)
    eval_out = infer(z, 3)  # train=False: no dropout
    assert np.all(np.asarray(eval_out["levels_used"]) == 3)


# ---- gradients ------------------------------------------------------------------------------

def test_straight_through_gradient_is_identity():
    """Unprojected levels: d z_q / d z is exactly the identity, for any strides."""
    model = ResidualVQ(3, 8, 3, (4, 2, 1), config=EMA_PLAIN)
    z = jax.random.normal(jax.random.key(0), (2, 8, 3))
    params, cb = init(model, z)
    f = lambda z: model.apply({"params": params, "codebook": cb}, z)["z_q"]
    jac = np.asarray(jax.jit(jax.jacrev(f))(z)).reshape(z.size, z.size)
    np.testing.assert_allclose(jac, np.eye(z.size), atol=1e-6)
    # ...while the value is the quantized one, not z.
    out = model.apply({"params": params, "codebook": cb}, z)
    decoded = model.apply({"params": params, "codebook": cb}, out["codes"], method=ResidualVQ.decode)
    np.testing.assert_allclose(np.asarray(out["z_q"]), np.asarray(decoded), atol=1e-6)
    assert np.abs(np.asarray(out["z_q"] - z)).max() > 0.1


@pytest.mark.parametrize("cfg", [FACTORIZED, EMA_PROJ], ids=["factorized", "ema"])
def test_straight_through_passes_the_projections(cfg):
    """Projected levels: the code lookup is transparent, so the Jacobian of a level's
    output is that of `out_proj(in_proj(z))`, the quantizer-free path."""
    level = VQLevel(6, 8, 2, 1, config=cfg)
    z = jax.random.normal(jax.random.key(0), (1, 4, 6))
    v = level.init(jax.random.key(1), z)
    jac = jax.jit(jax.jacrev(lambda z: level.apply(v, z)["z_q"]))(z)
    linear = jax.jit(jax.jacrev(
        lambda z: level.apply(v, z, method=lambda m, z: m.out_proj(m.in_proj(z)))))(z)
    np.testing.assert_allclose(np.asarray(jac), np.asarray(linear), atol=1e-6)
    assert np.abs(np.asarray(jac)).max() > 1e-3


@pytest.mark.parametrize(
    "cfg",
    [FACTORIZED, QuantizerConfig(detach_residual=False), EMA_PROJ, EMA_PLAIN],
    ids=["factorized", "factorized-dac-residual", "ema-projected", "ema-plain"],
)
def test_commitment_loss_of_every_level_has_gradient(cfg):
    model = ResidualVQ(8, 8, 4, (4, 2, 1), config=cfg)
    z = jax.random.normal(jax.random.key(0), (4, 32, 8))
    params, cb = init(model, z)
    _, cb = make_step(model)(params, cb, z, jax.random.key(1))  # k-means-initialised codebooks

    @jax.jit
    def commitments(z):  # [levels]: each level's summed commitment loss
        out, _ = model.apply({"params": params, "codebook": cb}, z, train=True,
                             rngs={"quantizer": jax.random.key(2)}, mutable=["codebook"])
        return jnp.stack([jnp.sum(c) for c in out["commitment_loss"]])

    grads = np.asarray(jax.jit(jax.jacrev(commitments))(z))  # [levels, *z.shape]
    assert np.all(np.isfinite(grads))
    norms = np.linalg.norm(grads.reshape(3, -1), axis=1)
    assert np.all(norms > 1e-3), f"levels without commitment gradient: {norms}"


def test_undetached_straight_through_residual_kills_the_gradient():
    """Control for the test above: chaining unprojected levels EnCodec's way (residual minus
    the straight-through output) leaves level 1's commitment with exactly zero gradient."""
    level0, level1 = VQLevel(4, 8, 4, config=EMA_PLAIN), VQLevel(4, 8, 4, config=EMA_PLAIN)
    z = jax.random.normal(jax.random.key(0), (2, 16, 4))
    v0, v1 = level0.init(jax.random.key(1), z), level1.init(jax.random.key(2), z)

    def commitment1(z):
        residual = z - level0.apply(v0, z)["z_q"]  # not detached: d residual / dz == 0
        return jnp.sum(level1.apply(v1, residual)["commitment_loss"])

    value, grad = jax.jit(jax.value_and_grad(commitment1))(z)
    assert value > 0
    assert np.all(np.asarray(grad) == 0)


# ---- EMA codebook learning -------------------------------------------------------------------

MEANS = np.array([[np.cos(a), np.sin(a)] for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)]) * 3.0


def mixture_batch(key, batch=16, time=32, sigma=0.1):
    """`[batch, time, 2]` samples of an 8-component Gaussian mixture (means on a circle)."""
    k1, k2 = jax.random.split(key)
    comp = jax.random.randint(k1, (batch, time), 0, len(MEANS))
    return jnp.asarray(MEANS, jnp.float32)[comp] + sigma * jax.random.normal(k2, (batch, time, 2))


def match_error(codebook, centers):
    """Max over centers of the distance to the nearest code, and whether the matching is 1:1."""
    d = np.linalg.norm(np.asarray(codebook)[:, None] - centers[None], axis=-1)
    return d.min(axis=0).max(), len(set(d.argmin(axis=0))) == len(centers)


def test_kmeans_finds_mixture_centroids():
    x = mixture_batch(jax.random.key(0)).reshape(-1, 2)
    centers, counts = kmeans(x, 8, jax.random.key(1), iters=10)
    err, one_to_one = match_error(centers, MEANS)
    assert one_to_one and err < 0.05
    assert float(counts.sum()) == x.shape[0]


def test_ema_codebook_converges_to_kmeans_centroids():
    # k-means++ seeding only (no Lloyd iterations): the codes start on single data points,
    # about sigma away from the centroids, and the EMA update has to do the averaging.
    cfg = QuantizerConfig(kind="ema", use_projection=False, kmeans_iters=0)
    model = ResidualVQ(2, 8, 2, (1,), config=cfg)
    key = jax.random.key(0)
    params, cb = init(model, mixture_batch(key))
    step = make_step(model)
    errors = []
    for i in range(400):
        _, cb = step(params, cb, mixture_batch(jax.random.fold_in(key, i)), jax.random.fold_in(key, 10_000 + i))
        errors.append(match_error(cb["level_0"]["embedding"], MEANS))
    # k-means centroids of the mixture, from a large sample: the means of the components.
    big = np.asarray(mixture_batch(jax.random.key(99), 256, 256)).reshape(-1, 2)
    labels = np.linalg.norm(big[:, None] - MEANS[None], axis=-1).argmin(1)
    centroids = np.stack([big[labels == j].mean(0) for j in range(len(MEANS))])
    final, one_to_one = match_error(cb["level_0"]["embedding"], centroids)
    assert one_to_one
    assert final < 0.01, final
    assert errors[0][0] > 3 * final  # the EMA, not the seeding, got it there


def bad_init_run(restart: bool, steps: int = 150):
    """64 codes all placed far from N(0, I) data: only one code can win assignments."""
    cfg = QuantizerConfig(kind="ema", use_projection=False, kmeans_init=False,
                          restart_dead_codes=restart)
    model = ResidualVQ(4, 64, 4, (1,), config=cfg)
    data = lambda k: jax.random.normal(k, (32, 32, 4))
    params, cb = init(model, data(jax.random.key(0)))
    bad = 10.0 + 0.01 * jax.random.normal(jax.random.key(1), (64, 4))
    cb = {"level_0": dict(cb["level_0"], embedding=bad, embed_sum=bad * cb["level_0"]["cluster_size"][:, None])}
    step = make_step(model)
    for i in range(steps):
        out, cb = step(params, cb, data(jax.random.key(100 + i)), jax.random.key(i))
    live = float(np.mean(np.asarray(cb["level_0"]["cluster_size"]) >= cfg.dead_code_threshold))
    held_out = model.apply({"params": params, "codebook": cb}, data(jax.random.key(7)))
    return live, float(held_out["quantizer_metrics"]["usage"][0]), out, held_out


def test_dead_code_restart_rescues_bad_initialisation():
    live, usage, out, held_out = bad_init_run(restart=True)
    assert live >= 0.95 and usage >= 0.95, (live, usage)
    assert int(held_out["quantizer_metrics"]["dead_codes"][0]) <= 3
    live_off, usage_off, out_off, _ = bad_init_run(restart=False)
    assert live_off <= 0.05 and usage_off <= 0.05, (live_off, usage_off)
    assert int(out_off["quantizer_metrics"]["dead_codes"][0]) >= 60
    assert float(out["quantizer_metrics"]["perplexity"][0]) > 10 * float(out_off["quantizer_metrics"]["perplexity"][0])


def numpy_ema_reference(cluster_size, embed_sum, x, codes, decay, eps):
    k = cluster_size.shape[0]
    counts = np.bincount(codes, minlength=k).astype(np.float64)
    sums = np.zeros_like(embed_sum, dtype=np.float64)
    np.add.at(sums, codes, x)
    cs = decay * cluster_size + (1 - decay) * counts
    es = decay * embed_sum + (1 - decay) * sums
    n = cs.sum()
    return cs, es, es / ((cs + eps) / (n + k * eps) * n)[:, None]


def test_ema_step_state_and_eval_isolation():
    cfg = QuantizerConfig(kind="ema", restart_dead_codes=False, kmeans_iters=20)
    model = ResidualVQ(8, 16, 4, (2,), config=cfg)
    z = jax.random.normal(jax.random.key(0), (8, 32, 8))
    params, cb0 = init(model, z)
    assert not bool(cb0["level_0"]["initialized"])
    variables = {"params": params, "codebook": cb0}

    # Inference never updates, even with the collection mutable.
    _, frozen = model.apply(variables, z, mutable=["codebook"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen["codebook"], cb0)

    step = make_step(model)
    out1, cb1 = step(params, cb0, z, jax.random.key(1))
    assert bool(cb1["level_0"]["initialized"])
    # First batch: k-means ran, so every used code sits at the mean of the batch vectors
    # assigned to it (the Lloyd fixed point; EMA on k-means statistics leaves it there).
    z_e = model.apply(variables, z, method=lambda m, z: m.levels[0].in_proj(avg_pool(z, 2)))
    x = np.asarray(z_e).reshape(-1, 4)
    emb1 = np.asarray(cb1["level_0"]["embedding"])
    codes = np.linalg.norm(x[:, None] - emb1[None], axis=-1).argmin(1)
    for j in np.unique(codes):
        np.testing.assert_allclose(emb1[j], x[codes == j].mean(0), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out1["codes"][0]).reshape(-1), codes)

    # Second batch: plain EMA step (no second k-means), matching a float64 reference.
    z2 = jax.random.normal(jax.random.key(5), (8, 32, 8))
    out2, cb2 = step(params, cb1, z2, jax.random.key(2))
    x2 = np.asarray(model.apply(variables, z2, method=lambda m, z: m.levels[0].in_proj(avg_pool(z, 2)))).reshape(-1, 4)
    codes2 = np.asarray(out2["codes"][0]).reshape(-1)
    np.testing.assert_array_equal(codes2, np.linalg.norm(x2[:, None] - emb1[None], axis=-1).argmin(1))
    cs, es, emb = numpy_ema_reference(np.asarray(cb1["level_0"]["cluster_size"], np.float64),
                                      np.asarray(cb1["level_0"]["embed_sum"], np.float64), x2,
                                      codes2, cfg.ema_decay, cfg.ema_eps)
    np.testing.assert_allclose(np.asarray(cb2["level_0"]["cluster_size"]), cs, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(cb2["level_0"]["embed_sum"]), es, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cb2["level_0"]["embedding"]), emb, rtol=1e-4, atol=1e-5)
    # The codebook losses are zero for EMA codebooks; the parameters never include them.
    assert all(float(jnp.abs(c).max()) == 0 for c in out2["codebook_loss"])
    assert "codebook" not in params["level_0"]


def test_ema_misuse_is_reported():
    model = ResidualVQ(4, 8, 4, (1,), config=EMA_PLAIN)
    z = jnp.ones((2, 4, 4))
    params, cb = init(model, z)
    with pytest.raises(ValueError, match="mutable"):
        model.apply({"params": params, "codebook": cb}, z, train=True, rngs={"quantizer": jax.random.key(0)})
    with pytest.raises(ValueError, match="rng"):
        model.apply({"params": params, "codebook": cb}, z, train=True, mutable=["codebook"])
    with pytest.raises(Exception, match="codebook"):
        model.apply({"params": params}, z)
    with pytest.raises(ValueError, match="multiple of 2"):
        ResidualVQ(4, 8, 4, (2, 1), config=EMA_PLAIN).init(jax.random.key(0), jnp.ones((1, 3, 4)))


@pytest.mark.parametrize("cfg", [EMA_PROJ, EMA_PLAIN], ids=["projected", "plain"])
def test_decode_from_a_prefix_of_levels(cfg):
    """decode(codes[:k]) reproduces inference with n_levels=k (variable bitrate)."""
    model = ResidualVQ(8, 16, 4, (4, 2, 1), config=cfg)
    z = jax.random.normal(jax.random.key(0), (4, 16, 8))
    params, cb = init(model, z)
    _, cb = make_step(model)(params, cb, z, jax.random.key(1))
    variables = {"params": params, "codebook": cb}
    codes = model.apply(variables, z)["codes"]
    for k in (1, 2, 3):
        out = model.apply(variables, z, n_levels=k)
        assert len(out["codes"]) == k
        for a, b in zip(out["codes"], codes):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        decoded = model.apply(variables, codes[:k], method=ResidualVQ.decode)
        np.testing.assert_allclose(np.asarray(decoded), np.asarray(out["z_q"]), atol=1e-5)
    with pytest.raises(ValueError, match="n_levels"):
        model.apply(variables, z, n_levels=4)


# ---- health metrics ---------------------------------------------------------------------------

def test_code_health_metrics():
    p, u = code_health(jnp.zeros((4, 8), jnp.int32), 16)
    assert float(p) == pytest.approx(1.0) and float(u) == pytest.approx(1 / 16)
    p, u = code_health(jnp.arange(32).reshape(2, 16) % 16, 16)
    assert float(p) == pytest.approx(16.0, rel=1e-5) and float(u) == 1.0
    p, _ = code_health(jnp.array([0, 0, 1, 1]), 8)
    assert float(p) == pytest.approx(2.0, rel=1e-6)


def test_training_codebook_health_counts_each_level_out_of_its_own_size():
    # The train/eval steps' `batch_usage` must divide by each level's own codebook size
    # (it once used the config's single size: a 16-code level fully used read as 25 %).
    from codec_jax.configs.tiny import get_config
    from codec_jax.training import builders, step

    cfg = get_config()
    cfg.quantizer.codebook_sizes = (16, 32, 64)
    generator = builders.build_generator(cfg)
    assert generator.codebook_sizes == (16, 32, 64)
    codes = [jnp.arange(2 * n).reshape(2, n) % n for n in (16, 32, 64)]  # every code twice
    metrics = step.codebook_health(codes, generator.codebook_sizes)
    for level, size in enumerate((16, 32, 64)):
        assert float(metrics[f"codebook/level_{level}/batch_usage"]) == 1.0
        assert float(metrics[f"codebook/level_{level}/batch_perplexity"]) == pytest.approx(size, rel=1e-5)
    half = step.codebook_health([jnp.arange(8)[None]], (16,))
    assert float(half["codebook/level_0/batch_usage"]) == 0.5


# ---- the codec --------------------------------------------------------------------------------

TINY = PRESETS["tiny"]


def test_factorized_params_layout_unchanged():
    shapes = jax.eval_shape(lambda: SNAC(TINY).init(jax.random.key(0), jnp.zeros((1, TINY.pad_multiple))))
    assert set(shapes) == {"params"}
    for i in range(TINY.n_levels):
        level = shapes["params"]["quantizer"][f"level_{i}"]
        assert set(level) == {"codebook", "in_proj", "out_proj"}
        assert level["codebook"].shape == (TINY.codebook_size, TINY.codebook_dim)


@pytest.mark.parametrize("quantizer", [pytest.param(QuantizerConfig(kind="ema", dropout_prob=1.0),
                                                   marks=pytest.mark.slow), FACTORIZED],  # ema: 43 s
                         ids=["ema", "factorized"])
def test_snac_training_call_contract(quantizer):
    # Smaller than the tiny preset (no attention, two blocks) to keep compile time down;
    # the quantizer wiring is the same.
    config = SNACConfig(sampling_rate=8000, encoder_dim=4, encoder_rates=(2, 3), decoder_dim=32,
                        decoder_rates=(3, 2), attn_window_size=None, codebook_size=16,
                        codebook_dim=4, vq_strides=(4, 2, 1))
    model = SNAC(config, quantizer=quantizer)
    audio = 0.1 * jax.random.normal(jax.random.key(0), (4, 2 * config.pad_multiple - 7))
    variables = model.init(jax.random.key(1), audio)
    assert set(variables) == ({"params", "codebook"} if quantizer.kind == "ema" else {"params"})
    params, cb = variables["params"], variables.get("codebook", {})
    if quantizer.kind == "ema":
        assert set(cb["quantizer"]) == {f"level_{i}" for i in range(config.n_levels)}
        assert "codebook" not in params["quantizer"]["level_0"]

    def forward(params, cb, audio, key):
        k1, k2 = jax.random.split(key)
        out, new = model.apply({"params": params, "codebook": cb}, audio, train=True,
                               rngs={"quantizer": k1, "noise": k2}, mutable=["codebook"])
        total = jnp.mean((out["audio"] - audio) ** 2) + sum(
            jnp.mean(c) for c in out["commitment_loss"] + out["codebook_loss"])
        return total, (out, new)

    if quantizer.kind == "ema":  # the gradient path through EMA levels; factorized is DAC's
        (total, (out, new)), grads = jax.jit(jax.value_and_grad(forward, has_aux=True))(
            params, cb, audio, jax.random.key(2))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
        assert float(jnp.abs(grads["quantizer"]["level_0"]["in_proj"]["direction"]).max()) > 0
    else:
        total, (out, new) = jax.jit(forward)(params, cb, audio, jax.random.key(2))
    assert set(new) == {"codebook"}
    b, frames = audio.shape[0], config.padded_length(audio.shape[1]) // config.hop_length
    assert out["audio"].shape == audio.shape
    assert out["latents"].shape == out["z_q"].shape == (b, frames, config.latent_channels)
    assert [c.shape for c in out["codes"]] == [(b, frames // s) for s in config.vq_strides]
    assert all(c.shape == (b,) for c in out["commitment_loss"] + out["codebook_loss"])
    assert set(out["quantizer_metrics"]) == {"perplexity", "usage", "dead_codes"}
    assert all(m.shape == (config.n_levels,) for m in out["quantizer_metrics"].values())
    assert out["levels_used"].shape == (b,)
    assert np.isfinite(float(total))
    if quantizer.kind == "ema":
        assert bool(new["codebook"]["quantizer"]["level_0"]["initialized"])
        # Inference with the trained state: codes, and decode from a prefix of levels.
        trained = {"params": params, "codebook": new["codebook"]}
        codes = model.apply(trained, audio, method=SNAC.encode)
        assert len(codes) == config.n_levels
        coarse = model.apply(trained, codes[:1], length=audio.shape[1], method=SNAC.decode)
        assert coarse.shape == audio.shape and np.all(np.isfinite(np.asarray(coarse)))
    else:
        assert new["codebook"] == {}
        np.testing.assert_array_equal(np.asarray(out["quantizer_metrics"]["dead_codes"]), 0)
