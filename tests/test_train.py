"""GAN training loop: end-to-end tiny run, exact resume after SIGTERM, NaN skipping,
fine-tuning from an imported SNAC checkpoint, configs and the command line.

The tests share one persistent XLA compilation cache, so the tiny train step is
compiled once for the whole module (and by the SIGTERM subprocess only loaded).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codec_jax.training import sharding as shard_lib
from codec_jax.cli import train as train_cli
from codec_jax.training import loop as trainer
from codec_jax.training.checkpoint import TrainCheckpointer
from codec_jax.configs import snac_24khz, snac_32khz, snac_44khz, tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """A compilation cache for this module only; the process-wide JAX setting is put back
    afterwards so that other test modules are unaffected."""
    from jax.experimental.compilation_cache import compilation_cache

    previous = jax.config.jax_compilation_cache_dir
    path = str(tmp_path_factory.mktemp("xla_cache"))
    yield path
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, xla_cache):
    """(config, workdir) of a finished 6-step tiny run with checkpoints 2, 4 and 6; tests
    copy the directory before changing anything in it."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    config = tiny_config(xla_cache, train__num_steps=6, logging__every_steps=2,
                         logging__eval_every_steps=0, checkpoint__every_steps=2,
                         checkpoint__keep=3)
    trainer.train_and_evaluate(config, str(workdir))
    return config, workdir


def tiny_config(cache_dir: str, **train):
    c = tiny.get_config()
    c.train.compilation_cache_dir = cache_dir
    for key, value in train.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


def read_metrics(workdir) -> dict[int, dict]:
    """step -> merged train/eval scalars from metrics.jsonl (later lines win)."""
    rows: dict[int, dict] = {}
    with open(Path(workdir) / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            rows.setdefault(row["step"], {}).update(row)
    return rows


def restore_state(config, workdir, step):
    """The checkpointed TrainState of `step` as host numpy arrays."""
    setup = trainer.create_training_setup(config)
    from codec_jax.data import pipeline

    it = pipeline.create_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                        seed=config.train.seed)
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"))
    try:
        state = ckpt.restore(step, setup.restore_target(), it)
        data_state = it.get_state()
    finally:
        ckpt.close()
        it.close()
    return jax.device_get(state), data_state


def assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------


@pytest.mark.long
def test_tiny_config_trains_end_to_end(tmp_path, xla_cache, capsys):
    """30 steps of the tiny config on the synthetic pipeline: the mel loss falls well
    below its initial value, every codebook level stays in use, checkpoints, TensorBoard
    summaries and eval are written."""
    config = tiny_config(xla_cache, train__num_steps=30, logging__every_steps=5,
                         logging__eval_every_steps=30, checkpoint__every_steps=15)
    final = trainer.train_and_evaluate(config, str(tmp_path))
    printed = capsys.readouterr().out
    for phase in ("building the train state", "compiling the train step",
                  "first step (compilation included)", "compiles the eval step"):
        assert phase in printed, printed

    rows = read_metrics(tmp_path)
    train_steps = sorted(s for s, r in rows.items() if "train/loss/mel" in r)
    assert train_steps == [5, 10, 15, 20, 25, 30]
    first, last = rows[5]["train/loss/mel"], rows[30]["train/loss/mel"]
    assert last < 0.7 * first, (first, last)
    for row in (rows[s] for s in train_steps):
        assert row["train/skipped"] == 0
        assert np.isfinite(row["train/grad_norm/generator"])
        assert row["train/perf/audio_seconds_per_s"] > 0
        for level in range(3):
            assert 0 < row[f"train/codebook/level_{level}/batch_usage"] <= 1
    # No codebook collapse. With the base recipe's EMA (decay 0.99, dead-code threshold a
    # tenth of the expected count) every level used 1-2 of its 64 codes from step 20 on
    # (batch usage 0.02-0.03, perplexity 1.0-1.07, no code ever restarted); with the tiny
    # config's (0.9, a fifth) 6-13 codes per batch (usage 0.09-0.20, perplexity 1.7-5.6).
    for step in (20, 25, 30):
        for level in range(3):
            assert rows[step][f"train/codebook/level_{level}/batch_usage"] > 3 / 64, (step, level)
    # Learning rate logged from the optimizer state (tiny: constant 1e-3).
    assert rows[30]["train/lr/generator"] == pytest.approx(1e-3)

    # Periodic evaluation on the held-out split.
    assert np.isfinite(rows[30]["eval/mel"]) and np.isfinite(rows[30]["eval/si_sdr"])
    # Not the degenerate full-scale +1/-1 (Nyquist) output that the mel loss cannot see:
    # without the tiny config's STFT loss this run reaches eval waveform L1 0.98 by step
    # 30; with it 0.08 (synthetic audio is at most ~0.5 in amplitude).
    assert rows[30]["eval/waveform_l1"] < 0.5, rows[30]["eval/waveform_l1"]
    assert final["eval/mel"] == pytest.approx(rows[30]["eval/mel"])
    assert 0 < rows[30]["eval/codes/level_0/batch_usage"] <= 1

    ckpt = TrainCheckpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [15, 30]
    ckpt.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    content = b"".join(p.read_bytes() for p in events)
    for tag in (b"train/loss/mel", b"eval/0/reconstruction", b"eval/0/spectrogram_original"):
        assert tag in content
    assert b"\x89PNG" in content  # spectrogram images are encoded
    assert json.loads((tmp_path / "config.json").read_text())["model"]["preset"] == "tiny"

    # The final generator is exported as an inference codec for the public API.
    import codec_jax

    codec = codec_jax.load_pretrained(str(tmp_path / "export"))
    assert codec.quantizer.kind == "ema" and "codebook" in codec.variables
    audio = np.random.default_rng(0).uniform(-0.1, 0.1, (1, 4000)).astype(np.float32)
    codes = codec.encode(audio)
    assert [c.shape[1] for c in codes] == codec.config.frames_per_level(4000)
    assert codec.decode(codes, length=4000).shape == (1, 4000)

    # Running again with the same target resumes at step 30, says so, does nothing more
    # and leaves no (empty) event file behind.
    capsys.readouterr()
    again = trainer.train_and_evaluate(config, str(tmp_path))
    assert again == {}
    assert "already at step 30 of 30; nothing to do" in capsys.readouterr().out
    assert sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*")) == sorted(events)

    # A damaged newest checkpoint is passed over for the previous one...
    import shutil

    from codec_jax.data import pipeline

    shutil.rmtree(tmp_path / "checkpoints" / "30" / "state")
    setup = trainer.create_training_setup(config)
    it = pipeline.create_train_iterator(config.data, global_batch_size=4, seed=0)
    ckpt = TrainCheckpointer(tmp_path / "checkpoints")
    state, step = ckpt.restore_latest(setup.restore_target(), it)
    assert step == 15 and int(state.step) == 15
    # ...but when nothing restores (here: another model), the run refuses to start over.
    other = tiny_config(xla_cache)
    other.discriminator.periods = (2, 3, 5)
    with pytest.raises(RuntimeError, match="none of the checkpoints"):
        ckpt.restore_latest(trainer.create_training_setup(other).restore_target(), it)
    ckpt.close()
    it.close()


# ---------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------


def _run_until_sigterm(workdir: Path, cache_dir: str, min_step: int, log_path: Path
                       ) -> subprocess.Popen:
    """Start `python -m codec_jax.cli.train` on the tiny config with a far-away target, wait until
    it has logged `min_step`, then SIGTERM it (as a preempted TPU VM would be)."""
    cmd = [sys.executable, "-m", "codec_jax.cli.train", "--config", "configs/tiny.py",
           "--workdir", str(workdir), "--config.train.num_steps=1000",
           "--config.logging.every_steps=1", "--config.logging.eval_every_steps=0",
           "--config.checkpoint.every_steps=1000",
           f"--config.train.compilation_cache_dir={cache_dir}"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # Output to a file: a full pipe would block the child.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(l)["step"] >= min_step
                                    for l in metrics.read_text().splitlines() if l.strip()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, log_path.read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    return proc


@pytest.mark.long
def test_resume_after_sigterm_is_bitwise_identical(tmp_path, xla_cache):
    """N steps in one run == a run killed by SIGTERM after k < N steps + a resumed run to
    N: identical per-step losses after the resume point and identical final state."""
    n = 8
    straight = tmp_path / "straight"
    config = tiny_config(xla_cache, train__num_steps=n, logging__every_steps=1,
                         logging__eval_every_steps=0, checkpoint__every_steps=1000)
    trainer.train_and_evaluate(config, str(straight))

    interrupted = tmp_path / "interrupted"
    log_path = tmp_path / "interrupted.log"
    proc = _run_until_sigterm(interrupted, xla_cache, min_step=2, log_path=log_path)
    proc.wait(timeout=300)
    output = log_path.read_text()
    # Not "done": a scheduler must restart a preempted job (train.preemption_exit_code).
    assert proc.returncode == 143, output[-3000:]
    assert "preempted: checkpoint" in output
    ckpt = TrainCheckpointer(interrupted / "checkpoints")
    (k,) = ckpt.all_steps()
    ckpt.close()
    assert 2 <= k < n, f"killed at step {k}; the test needs 2 <= k < {n}"

    trainer.train_and_evaluate(config, str(interrupted))

    a, b = read_metrics(straight), read_metrics(interrupted)
    for step in range(1, n + 1):
        keys = [key for key in a[step] if key.startswith("train/loss/")]
        assert keys
        for key in keys:  # JSON holds the exact float32 values
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])

    state_a, data_a = restore_state(config, straight, n)
    state_b, data_b = restore_state(config, interrupted, n)
    assert int(state_a.step) == int(state_b.step) == n
    assert_trees_equal(state_a, state_b)
    assert data_a == data_b  # the data pipeline resumed at the same batch


# ---------------------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------------------


@pytest.mark.long
def test_nan_batch_is_skipped_without_touching_the_state(xla_cache):
    config = tiny_config(xla_cache)
    setup = trainer.create_training_setup(config)
    state = setup.init_state()
    before = jax.device_get(state)

    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal((4, setup.num_samples))).astype(np.float32)
    bad = audio.copy()
    bad[1, 100] = np.nan
    state, metrics = setup.p_train_step(state, shard_lib.make_global_batch({"audio": bad}, setup.mesh))
    metrics = jax.device_get(metrics)
    assert metrics["skipped"] == 1 and metrics["skipped_total"] == 1
    assert metrics["consecutive_skips"] == 1
    assert not np.isfinite(metrics["loss/generator"])
    after = jax.device_get(state)
    assert int(after.step) == 1
    # Parameters, optimizer states, EMA codebooks and rng are bit-for-bit unchanged.
    for field in ("gen_params", "disc_params", "gen_opt_state", "disc_opt_state", "codebook", "rng"):
        assert_trees_equal(getattr(before, field), getattr(after, field))

    # A finite batch afterwards trains normally and resets the run of skips.
    state, metrics = setup.p_train_step(state, shard_lib.make_global_batch({"audio": audio}, setup.mesh))
    metrics = jax.device_get(metrics)
    assert metrics["skipped"] == 0 and metrics["skipped_total"] == 1
    assert metrics["consecutive_skips"] == 0
    changed = jax.device_get(state.gen_params)
    diffs = [np.any(x != y) for x, y in zip(jax.tree_util.tree_leaves(before.gen_params),
                                            jax.tree_util.tree_leaves(changed))]
    assert any(diffs)

    # Both steps ran one compiled program; a batch of another shape is refused instead of
    # silently recompiling.
    assert setup.train_step_traces.count == 1
    short = shard_lib.make_global_batch({"audio": audio[:, :2000]}, setup.mesh)
    with pytest.raises(trainer.RecompilationError, match="traced 2 times"):
        setup.p_train_step(state, short)


@pytest.mark.long
def test_many_nan_batches_stop_the_run(tmp_path, xla_cache, monkeypatch):
    from codec_jax.data import pipeline

    real = pipeline.create_train_iterator

    class Poisoned:
        """The real pipeline with NaNs written into every batch."""

        def __init__(self, inner):
            self.inner = inner

        def __next__(self):
            batch = next(self.inner)
            batch["audio"][:, ::7] = np.nan
            return batch

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(pipeline, "create_train_iterator", lambda *a, **k: Poisoned(real(*a, **k)))
    config = tiny_config(xla_cache, train__num_steps=50, train__max_consecutive_skips=3,
                         logging__eval_every_steps=0)
    with pytest.raises(trainer.NonFiniteTrainingError, match="3 consecutive steps"):
        trainer.train_and_evaluate(config, str(tmp_path))
    # Nothing was checkpointed: the broken run leaves no resume point behind.
    ckpt = TrainCheckpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == []
    ckpt.close()


def _poison_first_leaf(tree):
    """`tree` with the first float leaf's first element set to NaN."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    for i, x in enumerate(leaves):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.size:
            leaves[i] = x.at[(0,) * x.ndim].set(jnp.nan)
            break
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _all_finite(tree) -> bool:
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.floating))


@pytest.mark.long  # trains the tiny GAN step; >10 GB RSS per process seen on 2026-12-01
def test_nan_in_optimizer_state_is_never_applied_or_saved(tmp_path, xla_cache):
    """A NaN already in Adam's first moment leaves losses and gradients finite but would
    write NaN into the parameters: the step's check of the *new* state drops the update,
    and the checkpointer refuses to save a state holding a NaN."""
    config = tiny_config(xla_cache)
    setup = trainer.create_training_setup(config)
    state = setup.init_state()
    adam = state.gen_opt_state[1].inner_state[0]
    poisoned_mu = _poison_first_leaf(adam.mu)
    inner = (adam._replace(mu=poisoned_mu),) + tuple(state.gen_opt_state[1].inner_state[1:])
    opt1 = state.gen_opt_state[1]._replace(inner_state=inner)
    state = state.replace(gen_opt_state=(state.gen_opt_state[0], opt1) + tuple(state.gen_opt_state[2:]))
    before = jax.device_get(state.gen_params)

    audio = (0.1 * np.random.default_rng(0).standard_normal((4, setup.num_samples))).astype(np.float32)
    batch = shard_lib.make_global_batch({"audio": audio}, setup.mesh)
    state, metrics = setup.p_train_step(state, batch)
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss/generator"])  # the losses did not see it...
    assert metrics["skipped"] == 1 and metrics["skipped_bad_update"] == 1  # ...the check did
    assert_trees_equal(before, jax.device_get(state.gen_params))
    assert _all_finite(state.gen_params)

    from codec_jax.data import pipeline

    it = pipeline.create_train_iterator(config.data, global_batch_size=4, seed=0)
    ckpt = TrainCheckpointer(tmp_path / "checkpoints")
    try:
        assert ckpt.save(1, state, it) is False
        ckpt.wait()
        assert ckpt.all_steps() == []
    finally:
        ckpt.close()
        it.close()


def test_setup_rejects_non_finite_and_out_of_range_hyperparameters(xla_cache):
    from codec_jax.errors import UsageError

    for section, key, value, message in [
            ("optimizer.generator", "learning_rate", float("nan"), "learning_rate=nan"),
            ("optimizer.discriminator", "learning_rate", 0.0, "in (0, 1]"),
            ("optimizer.generator", "clip_norm", float("inf"), "clip_norm=inf"),
            ("optimizer.generator", "decay_rate", 1.5, "decay_rate=1.5"),
            ("losses.weights", "adversarial", float("inf"), "adversarial=inf"),
            ("losses.weights", "mel", -1.0, ">= 0")]:
        config = tiny_config(xla_cache)
        node = config
        for part in section.split("."):
            node = node[part]
        node[key] = value
        with pytest.raises(UsageError, match=re.escape(message)):
            trainer.create_training_setup(config)


@pytest.mark.long
@pytest.mark.parametrize("poison", ["nan_learning_rate", "inf_loss_weight"])
def test_poisoned_hyperparameters_never_reach_the_checkpoints(tmp_path, xla_cache, monkeypatch,
                                                              trained_run, poison, capsys):
    """With setup validation bypassed (as if a schedule produced the value mid-run), a
    NaN learning rate or an infinite loss weight on a resumed run: every update is
    dropped, the run stops naming the real last good step, and the newest checkpoint
    is the finite one from before."""
    import shutil

    config, source = trained_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    monkeypatch.setattr(trainer, "validate_hyperparameters", lambda config: None)
    from codec_jax.training import step as step_lib

    monkeypatch.setattr(step_lib, "_check_number", lambda key, value, **k: float(value))
    config = tiny_config(xla_cache, train__num_steps=12, train__max_consecutive_skips=3,
                         logging__every_steps=1, logging__eval_every_steps=0,
                         checkpoint__every_steps=1, checkpoint__keep=3)
    if poison == "nan_learning_rate":
        config.optimizer.generator.learning_rate = float("nan")
    else:
        config.losses.weights.adversarial = float("inf")
    with pytest.raises(trainer.NonFiniteTrainingError,
                       match=r"parameters are those of step 6; the newest checkpoint is step (6|7|8)\)"):
        trainer.train_and_evaluate(config, str(workdir))
    # Every checkpoint left behind restores, verifies and holds step 6's parameters.
    state6, _ = restore_state(config, source, 6)
    ckpt = TrainCheckpointer(workdir / "checkpoints")
    steps = ckpt.all_steps()
    ckpt.close()
    for step in steps:
        state, _ = restore_state(config, workdir, step)
        assert _all_finite(state)
        assert_trees_equal(state.gen_params, state6.gen_params)


# ---------------------------------------------------------------------------------------
# Checkpoint integrity
# ---------------------------------------------------------------------------------------


def _largest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _damage(step_dir: Path, kind: str) -> None:
    """Damage one checkpoint directory the way disks, buckets and copies do."""
    if kind == "flip_data_bytes":  # 64 bytes in the middle of the largest array file
        path = _largest_data_file(step_dir)
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        for i in range(middle, middle + 64):
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))
    elif kind == "truncate_data_file":
        path = _largest_data_file(step_dir)
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "garble_array_metadata":
        path = step_dir / "state" / "_METADATA"
        path.write_bytes(b"\x00garbage" + path.read_bytes()[50:])
    elif kind == "garble_ocdbt_manifest":
        path = step_dir / "state" / "manifest.ocdbt"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "garble_checksums":
        path = step_dir / "integrity" / "metadata"  # orbax's JsonSave file
        path.write_text(path.read_text().replace('"', "'", 3))
    elif kind == "delete_data_file":
        _largest_data_file(step_dir).unlink()
    else:
        raise AssertionError(kind)


DAMAGE_KINDS = ["flip_data_bytes", "truncate_data_file", "garble_array_metadata",
                "garble_ocdbt_manifest", "garble_checksums", "delete_data_file"]


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_checkpoint_integrity_on_a_small_state(tmp_path, kind, caplog):
    """The checkpointer alone, on a small pytree (fast: no model to compile): a state
    with a NaN is never saved; each kind of damage in the newest checkpoint is found,
    reported in one line, passed over for the previous checkpoint (values and data
    position exact), and the damaged step is replaced when it is saved again."""
    import logging

    import grain

    def iterator():
        return iter(grain.MapDataset.range(100).to_iter_dataset())

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    base = {"w": jnp.arange(20000, dtype=jnp.float32).reshape(100, 200) / 7,
            "b": jnp.ones(3), "n": jnp.int32(5)}
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), base)

    def state_at(step):
        return jax.tree_util.tree_map(lambda x: x + step, base)

    it = iterator()
    ckpt = TrainCheckpointer(tmp_path / "ckpt", keep=3)
    for step in (1, 2, 3):
        next(it)
        assert ckpt.save(step, state_at(step), it)
    poisoned = dict(state_at(4), b=base["b"].at[1].set(jnp.inf))
    assert ckpt.save(4, poisoned, it) is False  # refused: not a safe resume point
    ckpt.close()
    _damage(tmp_path / "ckpt" / "3", kind)

    caplog.clear()
    ckpt, it = TrainCheckpointer(tmp_path / "ckpt", keep=3), iterator()
    with caplog.at_level(logging.INFO):
        state, step = ckpt.restore_latest(abstract, it)
    assert step == 2 and ckpt.damaged == {3}
    assert_trees_equal(jax.device_get(state), jax.device_get(state_at(2)))
    assert next(it) == 2  # the data position of checkpoint 2
    (report,) = [r.getMessage() for r in caplog.records
                 if r.name == "codec_jax.training.checkpoint"]
    assert f"{tmp_path / 'ckpt' / '3'} (step 3) is damaged" in report
    assert "\n" not in report and len(report) < 600, report
    assert not [r for r in caplog.records if r.name == "absl" and r.levelno >= logging.WARNING]
    if kind == "flip_data_bytes":  # orbax read the flipped bytes as silently wrong values
        assert "array ['w'] differs from the checksum recorded at save" in report
    assert ckpt.save(3, state_at(3), it)  # the run reached step 3 again: replaced
    ckpt.close()
    ckpt, it = TrainCheckpointer(tmp_path / "ckpt", keep=3), iterator()
    state, step = ckpt.restore_latest(abstract, it)
    ckpt.close()
    assert step == 3 and not ckpt.damaged
    assert_trees_equal(jax.device_get(state), jax.device_get(state_at(3)))


@pytest.mark.long  # trains the tiny GAN step; >10 GB RSS per process seen on 2026-12-01
@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_damaged_checkpoints_are_detected_and_passed_over(tmp_path, trained_run, kind, caplog):
    """Each kind of damage in the newest checkpoint, then also in the middle one: the
    restore falls back to the newest sound checkpoint, reports each damaged one in one
    short line (path, step, why) and remembers it for replacement."""
    import logging
    import shutil

    from codec_jax.data import pipeline

    config, source = trained_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    setup = trainer.create_training_setup(config)
    expected = {2: restore_state(config, source, 2)[0], 4: restore_state(config, source, 4)[0]}
    for damaged, fallback in (((6,), 4), ((6, 4), 2)):
        for step in damaged:
            if step == damaged[-1]:
                _damage(workdir / "checkpoints" / str(step), kind)
        it = pipeline.create_train_iterator(config.data, global_batch_size=4, seed=0)
        ckpt = TrainCheckpointer(workdir / "checkpoints")
        caplog.clear()
        try:
            with caplog.at_level(logging.INFO):
                state, step = ckpt.restore_latest(setup.restore_target(), it)
        finally:
            ckpt.close()
            it.close()
        assert step == fallback and int(state.step) == fallback
        assert ckpt.damaged == set(damaged)
        assert_trees_equal(jax.device_get(state), expected[fallback])
        reports = [r.getMessage() for r in caplog.records
                   if r.name == "codec_jax.training.checkpoint"]
        assert len(reports) == len(damaged), reports
        for message, bad in zip(reports, damaged):
            assert f"{workdir / 'checkpoints' / str(bad)} (step {bad})" in message
            assert "\n" not in message and len(message) < 600, message
        # orbax's own logging stays quiet during the attempts (the 2.4 MB flood).
        assert not [r for r in caplog.records if r.name == "absl" and r.levelno >= logging.WARNING]
        if kind == "flip_data_bytes":  # the values changed silently: only the checksum saw it
            assert "differs from the checksum recorded at save" in reports[0]


@pytest.mark.long  # trains the tiny GAN step; >10 GB RSS per process seen on 2026-12-01
def test_damaged_checkpoints_are_replaced_when_the_run_reaches_them(tmp_path, trained_run,
                                                                   xla_cache, capsys):
    """A finished job whose final checkpoint is damaged retrains the last steps and
    writes a sound checkpoint 6 equal to the original; a running job (target 8) with
    damage in its middle and newest checkpoints resumes from 2 and replaces both."""
    import shutil

    config, source = trained_run
    state6, data6 = restore_state(config, source, 6)

    finished = tmp_path / "finished"
    shutil.copytree(source, finished)
    _damage(finished / "checkpoints" / "6", "flip_data_bytes")
    trainer.train_and_evaluate(config, str(finished))
    out = capsys.readouterr().out
    assert "resumed from" in out and "(step 4)" in out
    again, data_again = restore_state(config, finished, 6)
    assert_trees_equal(again, state6)  # exact resume: the replacement is bit-identical
    assert data_again == data6

    running = tmp_path / "running"
    shutil.copytree(source, running)
    _damage(running / "checkpoints" / "6", "truncate_data_file")
    _damage(running / "checkpoints" / "4", "delete_data_file")
    longer = tiny_config(xla_cache, train__num_steps=8, logging__every_steps=2,
                         logging__eval_every_steps=0, checkpoint__every_steps=2,
                         checkpoint__keep=3)
    trainer.train_and_evaluate(longer, str(running))
    assert "(step 2)" in capsys.readouterr().out
    ckpt = TrainCheckpointer(running / "checkpoints")
    assert ckpt.all_steps() == [4, 6, 8]
    ckpt.close()
    assert_trees_equal(restore_state(config, running, 6)[0], state6)
    assert int(restore_state(longer, running, 8)[0].step) == 8


# ---------------------------------------------------------------------------------------
# Fine-tuning from an imported SNAC checkpoint
# ---------------------------------------------------------------------------------------


@pytest.mark.long
def test_finetune_starts_from_imported_snac_generator(tmp_path, xla_cache):
    torch = pytest.importorskip("torch")
    snac = pytest.importorskip("snac")
    from codec_jax import checkpoint as ckpt_io
    from codec_jax.config import get_preset

    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = snac.SNAC(**preset.to_dict())
    hub = tmp_path / "snac_tiny"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps(preset.to_dict()))
    torch.save(model.state_dict(), hub / "pytorch_model.bin")

    config = tiny.get_config("finetune")
    assert config.quantizer.kind == "factorized"
    assert config.optimizer.generator.learning_rate == pytest.approx(1e-4)
    config.init.generator_checkpoint = str(hub)
    setup = trainer.create_training_setup(config)
    imported = trainer.load_generator_params(str(hub), setup.generator.config)
    state = setup.init_state(imported)
    _, expected = ckpt_io.load_snac_directory(hub)
    assert_trees_equal(jax.device_get(state.gen_params), expected)
    # Fresh discriminators: not part of the import.
    assert jax.tree_util.tree_leaves(state.disc_params)

    # An EMA-quantizer model has a different parameter tree: the error says so.
    ema = trainer.create_training_setup(tiny.get_config())
    with pytest.raises(ValueError, match="do not match"):
        ema.init_state(imported)
    # A checkpoint of another architecture is refused with what to change.
    other = tiny.get_config("finetune")
    other.model.overrides = {"noise": False}
    with pytest.raises(ValueError, match="model.preset"):
        trainer.load_generator_params(str(hub), trainer.create_training_setup(other).generator.config)


# ---------------------------------------------------------------------------------------
# Configs and the command line
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("module,preset,rate", [(snac_24khz, "snac_24khz", 24000),
                                                (snac_32khz, "snac_32khz", 32000),
                                                (snac_44khz, "snac_44khz", 44100),
                                                (tiny, "tiny", 16000)])
def test_configs_build_their_models(module, preset, rate):
    for variant in ("", "finetune", "factorized", "finetune,factorized"):
        c = module.get_config(variant)
        assert c.model.preset == preset and c.data.sample_rate == rate
        assert c.quantizer.kind == ("ema" if variant == "" else "factorized")
    c = module.get_config()
    # Every configured weight names a loss the train step computes (a typo'd key would
    # silently train without it), the presets keep the library's DAC weights, and only
    # tiny adds the MR-STFT loss (see configs/tiny.py).
    from codec_jax import losses
    from codec_jax.training import step

    assert set(c.losses.weights) == set(step.RECON_LOSSES + step.QUANTIZER_LOSSES)
    assert {k: c.losses.weights[k] for k in losses.DEFAULT_LOSS_WEIGHTS} == dict(losses.DEFAULT_LOSS_WEIGHTS)
    assert (c.losses.weights.stft > 0) == (preset == "tiny") and c.losses.weights.waveform == 0
    from codec_jax.training import builders as train_models

    generator = train_models.build_generator(c)
    assert generator.config.sampling_rate == rate
    assert generator.module.quantizer.kind == "ema"
    assert train_models.build_discriminator(c).names()
    with pytest.raises(ValueError, match="unknown config variant"):
        module.get_config("bogus")


def test_optimizer_schedule_and_clipping():
    import ml_collections

    from codec_jax.training import optim

    cfg = optim.optimizer_config(learning_rate=1e-3, decay_rate=0.5, clip_norm=1.0,
                                 weight_decay=0.0, warmup_steps=0)
    tx = optim.build_optimizer(cfg)
    params = {"w": jnp.zeros((3,))}
    state = tx.init(params)
    lrs = []
    for _ in range(3):
        # A huge gradient: clipping bounds the first Adam moment's input to norm 1.
        updates, state = tx.update({"w": jnp.array([1e6, 0.0, 0.0])}, state, params)
        lrs.append(float(optim.current_learning_rate(state)))
    np.testing.assert_allclose(lrs, [1e-3, 5e-4, 2.5e-4], rtol=1e-6)
    assert float(state[1].inner_state[0].mu["w"][0]) <= 1.0
    warm = optim.learning_rate_schedule(ml_collections.ConfigDict(dict(
        learning_rate=1.0, decay_rate=1.0, warmup_steps=4)))
    assert float(warm(2)) == pytest.approx(0.5) and float(warm(10)) == pytest.approx(1.0)


def test_loss_settings_reject_unknown_weights():
    from codec_jax.training.step import LossSettings

    c = tiny.get_config()
    c.losses.weights.mell = 1.0
    with pytest.raises(ValueError, match="mell"):
        LossSettings.from_config(c.losses, 16000)


def test_fetch_history_stacks_on_device_and_keeps_every_step():
    """The loop's interval fetch (one device-to-host copy per metric) gives the same host
    values, dtypes and aggregate as copying each step's scalars on its own."""
    import jax.numpy as jnp

    from codec_jax.training import metrics as tm

    history = [{"loss/mel": jnp.float32(1.5 * i), "skipped": jnp.int32(i % 2),
                "consecutive_skips": jnp.int32(i)} for i in range(7)]
    history[3]["loss/mel"] = jnp.float32(float("nan"))
    fetched = tm.fetch_history(history)
    plain = jax.device_get(history)
    assert len(fetched) == len(plain) == 7
    for got, want in zip(fetched, plain):
        assert got.keys() == want.keys()
        for key in want:
            assert np.asarray(got[key]).dtype == np.asarray(want[key]).dtype
            np.testing.assert_array_equal(got[key], want[key])
    assert tm.aggregate(fetched) == tm.aggregate(plain) == {
        "loss/mel": pytest.approx((0 + 1.5 + 3 + 6 + 7.5 + 9) / 6), "skipped": 3.0,
        "consecutive_skips": 6.0}
    assert tm.fetch_history([]) == []


def test_metric_aggregation_and_progress_line():
    from codec_jax.training import metrics as tm

    history = [{"loss/mel": 2.0, "skipped": 0, "consecutive_skips": 0},
               {"loss/mel": float("nan"), "skipped": 1, "consecutive_skips": 1},
               {"loss/mel": 4.0, "skipped": 0, "consecutive_skips": 0}]
    out = tm.aggregate(history)
    assert out == {"loss/mel": 3.0, "skipped": 1.0, "consecutive_skips": 0.0}
    assert np.isnan(tm.aggregate([{"x": float("nan")}])["x"])
    line = tm.progress_line(50, 100, {"loss/mel": 3.0, "perf/step_time_s": 2.0,
                                      "perf/audio_seconds_per_s": 8.0, "skipped": 2})
    assert "step 50/100 (50.0%)" in line and "ETA 1m40s" in line and "skipped 2" in line


def test_cli_usage_and_errors(capsys, tmp_path):
    """Every mistake in a `codec-jax train` command is one line on stderr, status 2,
    and nothing is written to the workdir."""
    from codec_jax import cli

    assert cli.main(["train", "--help"]) == 0
    assert "--workdir" in capsys.readouterr().out
    workdir = tmp_path / "run"
    cases = [
        (["--config", "tiny.py"], "--config and --workdir are required"),
        (["--config", "configs/tiny.py", "--config.train.steps=10"],
         "unknown config key 'train.steps'; did you mean train.num_steps"),
        (["--config", "configs/tiny.py", "--config.trian.seed=1"], "did you mean train"),
        (["--config", "configs/tiny.py:finetun"], "unknown config variant 'finetun'"),
        (["--config", "configs/tiyn.py"], "not found (shipped configs: snac_24khz.py"),
        (["--config", "tiny", "--config.train.num_steps=abc"], "num_steps=abc"),
        (["--config", "tiny", f"--config.init.generator_checkpoint={tmp_path / 'nope'}"],
         "no such directory"),
        (["--config", "tiny", "--config.model.preset=snac_24"],
         "unknown preset 'snac_24'; choose one of ['snac_24khz'"),
        (["--config", "tiny", "--config.optimizer.generator.learning_rate=nan"],
         "optimizer.generator.learning_rate=nan must be a finite number in (0, 1]"),
        (["--config", "tiny", "--config.losses.weights.mel=inf"],
         "losses.weights.mel=inf must be a finite number >= 0"),
        (["--config", "tiny", "--config.optimizer.discriminator.clip_norm=inf"], "clip_norm=inf"),
        (["--config", "tiny", "--config.optimizer.generator.b2=1.0"], "b2=1.0"),
        (["--config", "tiny", "--bogus"], "unknown argument '--bogus'"),
    ]
    for args, expected in cases:
        if "--workdir" not in args and args != ["--config", "tiny.py"]:
            args = args + ["--workdir", str(workdir)]
        assert cli.main(["train"] + args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("codec-jax train: ") and err.count("\n") == 1, err
        assert expected in err, (expected, err)
    assert not workdir.exists()
    # A bare config name resolves to the configs shipped with the package.
    resolved = train_cli._resolve_config_path(["--config", "snac_24khz.py:finetune"])
    assert resolved[1].endswith(os.path.join("configs", "snac_24khz.py") + ":finetune")
    assert os.path.exists(resolved[1].split(":")[0])
    # Overrides of the right type still apply.
    config, _, _ = train_cli.parse_args(["--config", "tiny", "--workdir", "x",
                                         "--config.train.num_steps=7",
                                         "--config.optimizer.generator.learning_rate", "2e-4"])
    assert config.train.num_steps == 7
    assert config.optimizer.generator.learning_rate == pytest.approx(2e-4)


@pytest.mark.parametrize("command", ["", "train", "prepare-data", "encode", "decode",
                                     "roundtrip", "convert"])
def test_help_imports_no_jax(command):
    """`codec-jax [command] --help` answers without importing JAX (seconds otherwise)."""
    args = [command, "--help"] if command else ["--help"]
    code = ("import sys\nfrom codec_jax.cli import main\n"
            "try:\n    rc = main(%r)\nexcept SystemExit as e:  # argparse's --help\n"
            "    rc = e.code or 0\n"
            "print('JAX' if 'jax' in sys.modules else 'NOJAX', rc)" % (args,))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()
    assert out.stdout.strip().splitlines()[-1] == "NOJAX 0", out.stdout[-500:]


@pytest.mark.long
def test_step_wiring_of_optional_losses_discriminators_and_balancer():
    """Every config branch of the step traces: EnCodec balancer, hinge loss, MS-STFT
    discriminator, MR-STFT and waveform losses, factorized codebooks, bfloat16 compute.
    (Traced with `jax.eval_shape`, not compiled: the numerics of each piece are tested
    with the losses / discriminators / quantizer.)"""
    c = tiny.get_config("factorized")
    c.model.dtype = "bfloat16"
    c.losses.balancer.enabled = True
    c.losses.gan_kind = "hinge"
    c.losses.reduction = "mean"
    c.losses.weights.stft = 1.0
    c.losses.weights.waveform = 1.0
    c.discriminator.kinds = ("msstft", "mpd")
    setup = trainer.create_training_setup(c)
    state = setup.abstract_state
    batch = {"audio": jax.ShapeDtypeStruct((4, setup.num_samples), jnp.float32)}
    new_state, metrics = jax.eval_shape(setup.p_train_step, state, batch)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    for name in ("mel", "stft", "waveform", "adversarial", "feature_matching", "commitment",
                 "codebook", "generator", "discriminator"):
        assert metrics[f"loss/{name}"].shape == ()
    assert "balancer/grad_ratio/mel" in metrics
    assert state.balancer is not None and state.codebook == {}
    # bfloat16 compute keeps float32 parameters and optimizer state.
    assert {x.dtype for x in jax.tree_util.tree_leaves(state.gen_params)} == {jnp.dtype("float32")}


def test_update_check_catches_a_non_finite_value_in_any_leaf():
    """The step's guard on what an update produces: any NaN/inf in any leaf of either
    update tree (as a NaN learning rate or a NaN Adam moment makes) marks the step bad;
    finite updates, zero ones included, pass."""
    from codec_jax.training.step import _updates_finite

    good = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2, 2)), "d": jnp.full((4,), -2.5)}}
    assert bool(_updates_finite(good, good))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for path in ("a", "c", "d"):
            poisoned = {"a": good["a"], "b": dict(good["b"])}
            if path == "a":
                poisoned["a"] = good["a"].at[2].set(bad)
            else:
                poisoned["b"][path] = good["b"][path].reshape(-1).at[0].set(bad).reshape(good["b"][path].shape)
            assert not bool(_updates_finite(good, poisoned)), (bad, path)
            assert not bool(_updates_finite(poisoned, good)), (bad, path)


@pytest.mark.parametrize("kernel", [True, False])
def test_state_initialiser_lowers_threefry_to_the_gpu_kernel_as_configured(kernel, monkeypatch):
    """`train.threefry_gpu_kernel_init` (default on) makes the state initialiser's threefry
    a call of JAX's CUDA kernel when lowered for a GPU: one kernel instead of an unrolled
    hash per parameter took the snac_24khz initialiser's compile from 129 s to 4-7 s on an
    H200 (BENCHMARKS §5). Lowered for CUDA from this CPU, so it needs no GPU. The train
    step, traced outside the initialiser's context, keeps the unrolled lowering."""
    from codec_jax.training import state as ts

    config = tiny_config("", train__threefry_gpu_kernel_init=kernel)
    setup = trainer.create_training_setup(config)
    key = ts.rng_from_seed(0)
    with setup.init_lowering():
        cuda = jax.jit(setup.init_fn).trace(key).lower(lowering_platforms=("cuda",)).as_text()
    assert ("cu_threefry2x32" in cuda) is kernel
    outside = jax.jit(setup.init_fn).trace(key).lower(lowering_platforms=("cuda",)).as_text()
    assert "cu_threefry2x32" not in outside
    assert jax.config.jax_threefry_gpu_kernel_lowering is False  # put back

    # init_state compiles inside that context (what the trainer and notebooks call).
    seen = []
    monkeypatch.setattr(ts, "create_sharded_state", lambda *a, **k: (
        seen.append(jax.config.jax_threefry_gpu_kernel_lowering), ("state", None))[1])
    assert setup.init_state() == "state"
    assert seen == [kernel]
    assert jax.config.jax_threefry_gpu_kernel_lowering is False


@pytest.mark.parametrize("fast", [True, False])
def test_state_initialiser_compiles_at_llvm_level_0_on_the_cpu_as_configured(fast, monkeypatch):
    """`train.fast_init_compile` (default on) compiles the state initialiser with LLVM
    optimisation level 0 on the CPU: it runs once, so only its compile time counts
    (tiny config, 2-core VM: 9.0 s instead of 14.2 s, BENCHMARKS §5). Off, or on another
    backend, the initialiser gets XLA's default options."""
    from codec_jax.training import state as ts

    setup = trainer.create_training_setup(tiny_config("", train__fast_init_compile=fast))
    expected = {"xla_backend_optimization_level": 0} if fast else {}
    assert setup.init_compiler_options() == expected
    seen = []
    monkeypatch.setattr(ts, "create_sharded_state", lambda *a, **k: (
        seen.append(k.get("compiler_options")), ("state", None))[1])
    assert setup.init_state() == "state"
    assert seen == [expected]

    class FakeDevice:
        platform = "gpu"

    class FakeMesh:
        devices = np.array([FakeDevice()])

    gpu_setup = dataclasses.replace(setup, mesh=FakeMesh())
    assert gpu_setup.init_compiler_options() == {}


@pytest.mark.slow
def test_state_initialiser_at_llvm_level_0_builds_the_same_state():
    """The level-0 initialiser's state equals the default-compiled one: every integer and
    codebook array bit for bit, floats within float32 rounding (a reduction may be summed in
    another order), and the options are really passed to XLA's compile."""
    from codec_jax.training import state as ts

    setup = trainer.create_training_setup(tiny_config(""))
    options = setup.init_compiler_options()
    assert options == {"xla_backend_optimization_level": 0}
    seen = []
    real_compile = jax.stages.Lowered.compile

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("compiler_options"))
        return real_compile(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(jax.stages.Lowered, "compile", spy)
        fast = setup.init_state()
    assert options in seen
    default, _ = ts.create_sharded_state(setup.init_fn, int(setup.config.train.seed), setup.mesh,
                                         int(setup.config.mesh.fsdp_min_size))
    fast_leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(fast))
    default_leaves = jax.tree_util.tree_leaves(jax.device_get(default))
    assert len(fast_leaves) == len(default_leaves) > 100
    for (path, a), b in zip(fast_leaves, default_leaves):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, path
        if np.issubdtype(a.dtype, np.floating):
            scale = max(float(np.max(np.abs(b))), 1e-30) if b.size else 1.0
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-7 * scale, err_msg=str(path))
        else:
            np.testing.assert_array_equal(a, b, err_msg=str(path))


def test_skip_select_is_one_conditional_on_the_cpu_and_a_where_per_leaf_elsewhere():
    """The step keeps the old state on a skipped step with `step._select`: one `lax.cond`
    over the whole tree when compiled for the CPU (a `select` fusion per leaf was 15-19 %
    of the tiny step's CPU compile), a `where` per leaf for GPUs (a GPU conditional waits
    on the host for its predicate). Both give exactly `new` or `old`."""
    from codec_jax.training import step as step_lib

    new = {"w": jnp.arange(6.0).reshape(2, 3), "n": (jnp.int32(7), None),
           "nan": jnp.full((2,), jnp.nan)}
    old = {"w": -jnp.ones((2, 3)), "n": (jnp.int32(-1), None), "nan": jnp.zeros((2,))}
    for select in (step_lib._select, step_lib._select_by_cond, step_lib._select_by_where):
        for ok, want in ((True, new), (False, old)):
            got = jax.jit(select)(jnp.bool_(ok), new, old)
            assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
            for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                np.testing.assert_array_equal(g, w)
    traced = jax.jit(step_lib._select).trace(jnp.bool_(True), new, old)
    cpu_hlo = jax.jit(step_lib._select).lower(jnp.bool_(True), new, old).compile().as_text()
    assert " conditional(" in cpu_hlo and " select(" not in cpu_hlo
    # For CUDA: the predicate is only ever an operand of `select`s (the platform switch
    # itself is a `case` on a constant, which XLA folds away).
    cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert cuda.count("stablehlo.select") == 3
    assert "stablehlo.convert %arg0" not in cuda
    assert "stablehlo.convert %arg0" in traced.lower(lowering_platforms=("cpu",)).as_text()


def test_compilation_cache_defaults_to_the_workdir():
    """`train.compilation_cache_dir` defaults to `{workdir}/compilation_cache`: a preempted
    or resumed run loads its compiled programs (a restart's first step on an H200: 21.5-27.9 s
    where it loaded, against 200+ s). Without a workdir (a setup built in a notebook) it means no cache;
    an explicit directory or "" (off) is kept as given."""
    default = tiny.get_config().train.compilation_cache_dir
    assert default == "{workdir}/compilation_cache"
    assert trainer.resolve_cache_dir(default, "/runs/a/") == "/runs/a/compilation_cache"
    assert trainer.resolve_cache_dir(default, "gs://b/run") == "gs://b/run/compilation_cache"
    assert trainer.resolve_cache_dir(default, None) == ""
    assert trainer.resolve_cache_dir("/shared/cache", "/runs/a") == "/shared/cache"
    assert trainer.resolve_cache_dir("", "/runs/a") == ""


@pytest.mark.slow
def test_a_default_run_keeps_its_compiled_programs_in_the_workdir(tmp_path):
    """With the default config the run writes its programs to WORKDIR/compilation_cache
    while it runs and puts the process's previous cache setting back afterwards; a rerun
    in the same workdir (a resume) loads the train step from there instead of compiling."""
    from jax._src import monitoring

    previous = jax.config.jax_compilation_cache_dir
    workdir = tmp_path / "run"
    c = tiny.get_config()
    c.train.num_steps = 1
    c.logging.every_steps = 1
    c.logging.eval_every_steps = 0
    c.checkpoint.every_steps = 0
    trainer.train_and_evaluate(c, str(workdir))
    cache = workdir / "compilation_cache"
    assert any(cache.iterdir()), "no compiled program was written to the workdir's cache"
    assert jax.config.jax_compilation_cache_dir == previous

    hits = []

    def listener(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    monitoring.register_event_listener(listener)
    try:
        c.train.num_steps = 2
        trainer.train_and_evaluate(c, str(workdir))
    finally:
        monitoring.unregister_event_listener(listener)
    assert hits, "the resumed run compiled again instead of loading the workdir's cache"
    assert jax.config.jax_compilation_cache_dir == previous
