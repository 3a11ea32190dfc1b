"""Train a 48 kHz stereo codec: the SNAC 32/44.1 kHz architecture with both channels coded
jointly (`snac_48khz_stereo` preset; no published weights exist, so it trains from scratch).

  codec-jax train --config configs/snac_48khz_stereo.py --workdir /path/to/run

Data: stereo sources (`codec-jax prepare-data` keeps the channels of the files it reads;
the pipeline's `channel_mode = "keep"` takes the first two and duplicates mono files).
The default synthetic source gives panned mixes of two signals. Losses and the
discriminators judge each channel as its own signal (`training.step.channels_to_batch`).
"""

from codec_jax.configs.base import apply_variants, base_config


def get_config(arg: str | None = None):
    config = base_config("snac_48khz_stereo", batch_size=8, crop_seconds=1.0)
    return apply_variants(config, arg)
