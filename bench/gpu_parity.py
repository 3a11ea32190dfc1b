"""Parity of codec_jax on the accelerator against the reference SNAC on the CPU.

Same strong reference models as tests/test_parity.py (perturbed weights, codebooks from
latents). Reports code agreement, latent relative error and decode max-abs error with
JAX's default float32 matmul/conv precision (TF32 on NVIDIA tensor cores) and with
`jax_default_matmul_precision=highest`.
"""

from __future__ import annotations

import os
import sys

import numpy as np

here = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(here, ".."))
sys.path.insert(0, os.path.join(here, "..", "tests"))

import jax  # noqa: E402

import codec_jax  # noqa: E402
from snac_reference import (build_reference, disable_noise, make_signals, reference_decode,  # noqa: E402
                            reference_encode, save_hub_directory)


def main():
    import tempfile

    print("device:", jax.devices()[0].device_kind)
    print("| preset | precision | code agreement per level | latent rel err | decode max abs |")
    print("|---|---|---|---|---|")
    for preset in sys.argv[1:] or ["tiny", "snac_24khz", "snac_44khz"]:
        config = codec_jax.get_preset(preset)
        model = build_reference(config.to_dict(), seed=3)
        disable_noise(model)
        path = save_hub_directory(model, config.to_dict(), tempfile.mkdtemp())
        codec = codec_jax.load_pretrained(path)
        audio = np.concatenate([make_signals(k, 2, int(1.0 * config.sampling_rate), config.sampling_rate, 5)
                                for k in ("noise", "speech", "music")])
        z_ref, codes_ref = reference_encode(model, audio)
        y_ref = reference_decode(model, codes_ref)
        for precision in ("default", "highest"):
            with jax.default_matmul_precision(precision):
                jax.clear_caches()
                z = np.asarray(codec_jax.encode_latents(codec.variables, audio, config=config))
                codes = [np.asarray(c) for c in codec.encode(audio)]
                y = np.asarray(codec.decode(codes_ref))
            agree = ", ".join(f"{(a == b).mean():.4f}" for a, b in zip(codes, codes_ref))
            rel = np.abs(z - z_ref).max() / np.abs(z_ref).max()
            print(f"| {preset} | {precision} | {agree} | {rel:.2e} | {np.abs(y - y_ref).max():.2e} |",
                  flush=True)


if __name__ == "__main__":
    main()
