"""Files written by the previous code (commit 8b11dd9, before the layout moves) still load.

tests/fixtures/compat_8b11dd9/ holds what that commit wrote (see its README.md):

* `tiny_run/`: the workdir of a one-step `codec-jax train` run made by `make_tiny_run.py`:
  its checkpoint `checkpoints/1/` (train state and data iterator position), the
  `config.json` it ran with, and the codec it exported (`export/`, EMA codebooks);
* `codec_expected.npz`: a clip, its codes and decoded audio, and the decoded audio of
  random codes, all as that code computed them with the exported codec
  (`make_codec_expected.py`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import codec_jax

FIXTURES = Path(__file__).parent / "fixtures" / "compat_8b11dd9"
RUN = FIXTURES / "tiny_run"


def test_codec_saved_by_previous_code_reproduces_its_codes_and_audio():
    codec = codec_jax.load_pretrained(RUN / "export")
    assert codec.quantizer.kind == "ema"
    with np.load(FIXTURES / "codec_expected.npz") as expected:
        assert int(expected["sample_rate"]) == codec.sample_rate
        audio = expected["audio"]
        codes = codec.encode(audio)
        assert len(codes) == codec.config.n_levels
        for level, c in enumerate(codes):
            np.testing.assert_array_equal(np.asarray(c), expected[f"codes_{level}"],
                                          err_msg=f"level {level}")
        decoded = np.asarray(codec.decode(codes, length=audio.shape[1]))
        np.testing.assert_allclose(decoded, expected["decoded"], atol=1e-5)
        # Random codes read every codebook entry and the whole decoder.
        random_codes = [expected[f"random_codes_{level}"] for level in range(codec.config.n_levels)]
        assert min(np.unique(c).size for c in random_codes) > 16
        random_decoded = np.asarray(codec.decode(random_codes, length=audio.shape[1]))
        assert np.abs(expected["random_decoded"]).max() > 1e-3  # not a trivially silent output
        np.testing.assert_allclose(random_decoded, expected["random_decoded"], atol=1e-5)


def _old_run_config(num_steps: int):
    """Today's tiny config with the settings `make_tiny_run.py` gave the old trainer."""
    from codec_jax.configs.tiny import get_config

    c = get_config()
    c.model.overrides = dict(encoder_dim=16, encoder_rates=(2, 3), decoder_dim=64,
                             decoder_rates=(3, 2))
    c.discriminator.kinds = ("mpd",)
    c.discriminator.periods = (2,)
    c.discriminator.channel_scale = 1 / 32
    c.train.num_steps = num_steps
    c.checkpoint.every_steps = 1
    c.checkpoint.keep = 2
    c.checkpoint.async_save = False
    c.logging.every_steps = 1
    c.logging.eval_every_steps = 0
    return c


def _name(key) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaves_by_path(tree) -> dict[tuple[str, ...], np.ndarray]:
    """Leaves keyed by their path of names, the same for a TrainState and the plain dicts
    and lists that orbax reads back without a target."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(_name(k) for k in path): np.asarray(leaf) for path, leaf in flat}


@pytest.mark.slow
def test_training_checkpoint_from_previous_code_restores_into_todays_state(tmp_path):
    from codec_jax.data import pipeline
    from codec_jax.training.checkpoint import TrainCheckpointer
    from codec_jax.training.loop import create_training_setup

    run = RUN
    saved_config = json.loads((run / "config.json").read_text())
    config = _old_run_config(num_steps=2)
    # The config keys the old trainer wrote are the ones today's configs have.
    assert set(saved_config) == set(config.to_dict())
    assert saved_config["model"]["overrides"]["decoder_dim"] == config.model.overrides["decoder_dim"]

    setup = create_training_setup(config)
    train_iter = pipeline.create_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                                seed=config.train.seed)
    # A copy: the checkpoint manager may tidy its directory.
    shutil.copytree(run / "checkpoints", tmp_path / "copy")
    checkpointer = TrainCheckpointer(str(tmp_path / "copy"), keep=2, async_save=False)
    try:
        assert checkpointer.all_steps() == [1]
        state = checkpointer.restore(1, setup.restore_target(), train_iter)
    finally:
        checkpointer.close()
    assert int(state.step) == 1
    # Every array the old code saved arrives at the same place in today's TrainState.
    with ocp.PyTreeCheckpointer() as reader:
        raw = reader.restore((run / "checkpoints" / "1" / "state").absolute())
    restored = _leaves_by_path(state)
    saved = _leaves_by_path(raw)
    assert restored.keys() == saved.keys()
    for key, value in saved.items():
        np.testing.assert_array_equal(restored[key], value, err_msg=key)
    # The restored generator is the trained one, not a fresh initialisation.
    fresh = _leaves_by_path(setup.init_state().gen_params)
    assert any(not np.array_equal(fresh[k], v) for k, v in _leaves_by_path(state.gen_params).items())
    # The data iterator continues where the old run stopped (one batch of 4 drawn).
    assert json.loads((run / "checkpoints" / "1" / "data" / "process_0-of-1.json").read_text()) \
        == {"next_index": 4}
    train_iter.close()


@pytest.mark.long
def test_training_resumes_from_previous_codes_checkpoint(tmp_path, capsys):
    from codec_jax.training.loop import train_and_evaluate

    workdir = tmp_path / "run"
    shutil.copytree(RUN, workdir)
    final = train_and_evaluate(_old_run_config(num_steps=2), str(workdir))
    out = capsys.readouterr().out
    assert "(step 1)" in out and "resumed from" in out
    assert np.isfinite(final["loss/mel"]) and final["loss/mel"] > 0
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    assert (workdir / "export" / "config.json").exists()
