"""Train a SNAC 32 kHz codec (the published `hubertsiuzdak/snac_32khz` architecture).

  codec-jax train --config configs/snac_32khz.py --workdir /path/to/run
  codec-jax train --config configs/snac_32khz.py:finetune --workdir /path/to/run \
      --config.init.generator_checkpoint=/path/to/snac_32khz

Data: set `--config.data.sources` to prepared TFDS datasets (see docs/data.md); the
default synthetic source only checks that everything runs.
"""

from codec_jax.configs.base import apply_variants, base_config


def get_config(arg: str | None = None):
    config = base_config("snac_32khz", batch_size=16, crop_seconds=1.0)
    config.logging.eval_perceptual = True  # PESQ-wb / STOI / ViSQOL at every eval
    return apply_variants(config, arg)
