"""Training configs: crops fit the model's padding, derived values follow overrides.

Overrides go through ml_collections' `config_flags`, as `codec-jax train` applies them.
"""

from __future__ import annotations

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from codec_jax.cli.train import _resolve_config_path
from codec_jax.config import get_preset
from codec_jax.configs import base


def load(name: str, *overrides: str) -> ml_collections.ConfigDict:
    """`name`'s config with `--config.K=V` overrides, parsed as the CLI parses them."""
    argv = ["codec-jax train"] + _resolve_config_path([f"--config={name}", *overrides])
    fv = flags.FlagValues()
    # config_flags reads the overrides from `sys_argv` (default: sys.argv).
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


def crop_samples(c) -> int:
    return int(round(c.data.crop_seconds * c.data.sample_rate))


@pytest.mark.parametrize("name,preset,samples", [("snac_24khz", "snac_24khz", 24576),
                                                 ("snac_32khz", "snac_32khz", 36864),
                                                 ("snac_44khz", "snac_44khz", 49152),
                                                 ("tiny", "tiny", 4032)])
def test_training_crops_are_whole_padding_multiples(name, preset, samples):
    """The default crop is the requested one rounded up to the padding multiple: the
    generator computes the same padded length as before, now all of it audio."""
    c = load(name)
    snac = get_preset(preset)
    assert crop_samples(c) == samples
    assert samples % snac.pad_multiple == 0
    requested = int(round(c.train.crop_seconds * snac.sampling_rate))
    assert snac.padded_length(requested) == samples  # no extra compute
    assert requested <= samples < requested + snac.pad_multiple


def test_a_requested_crop_from_the_command_line_is_rounded_and_moves_the_threshold():
    c = load("snac_32khz", "--config.train.crop_seconds=2.0")
    assert crop_samples(c) == 73728  # 64000 samples -> 6 x 12288
    default = load("snac_32khz")
    # Twice the frames per example: twice the expected assignments per code.
    assert c.quantizer.dead_code_threshold == pytest.approx(
        2 * default.quantizer.dead_code_threshold)


def test_derived_values_follow_the_batch_size_override():
    default = load("snac_24khz")
    c = load("snac_24khz", "--config.train.batch_size=64")
    assert c.train.batch_size == 64 and c.logging.eval_batch_size == 64
    assert c.quantizer.dead_code_threshold == pytest.approx(
        4 * default.quantizer.dead_code_threshold)
    # 24 kHz, 64 x 1.024 s: 12 level-0 frames per example, 4096 codes.
    assert c.quantizer.dead_code_threshold == pytest.approx(0.1 * 64 * 12 / 4096)


def test_setting_a_derived_value_replaces_its_formula_only():
    c = load("snac_24khz", "--config.train.batch_size=32", "--config.logging.eval_batch_size=8",
             "--config.quantizer.dead_code_threshold=0.5", "--config.data.crop_seconds=0.5")
    assert c.train.batch_size == 32  # the knob keeps its own value
    assert c.logging.eval_batch_size == 8 and c.quantizer.dead_code_threshold == 0.5
    assert c.data.crop_seconds == 0.5  # an exact crop, used as given
    # An explicit crop still moves the threshold unless that is set too.
    c = load("snac_24khz", "--config.data.crop_seconds=2.048")
    assert c.quantizer.dead_code_threshold == pytest.approx(0.1 * 16 * 24 / 4096)


def test_resolved_copy_keeps_the_final_values():
    """The trainer works on `ConfigDict(config.to_dict())`: plain values, same numbers."""
    c = load("tiny", "--config.train.batch_size=8")
    resolved = ml_collections.ConfigDict(c.to_dict())
    assert resolved.logging.eval_batch_size == 8
    assert resolved.quantizer.dead_code_threshold == c.quantizer.dead_code_threshold
    assert resolved.data.crop_seconds == c.data.crop_seconds


def test_crop_rounding_helper():
    snac = get_preset("snac_32khz")
    assert base.crop_seconds_for(snac, 1.0) * 32000 == pytest.approx(36864)
    assert base.crop_seconds_for(snac, 1.152) * 32000 == pytest.approx(36864)  # already whole
    assert base.crop_seconds_for(snac, 1.153) * 32000 == pytest.approx(2 * 24576)
