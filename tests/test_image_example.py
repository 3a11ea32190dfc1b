"""The image compression example (2-D multi-scale RVQ) runs small and its figures make sense."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "image_rvq.py"


def load_example():
    spec = importlib.util.spec_from_file_location("image_rvq", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # flax modules are dataclasses, which look themselves up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.long
def test_image_example_more_levels_cost_more_bits_and_reconstruct_better(tmp_path, capsys):
    pytest.importorskip("skimage")
    example = load_example()
    # 64 codes per 16x16 block, 128 per 8x8, 256 per 4x4 over 32x32 pixels.
    assert [example.bits_per_pixel(n) for n in (1, 2, 3)] == pytest.approx(
        [4 * 6 / 1024, (4 * 6 + 16 * 7) / 1024, (4 * 6 + 16 * 7 + 64 * 8) / 1024])
    results = example.main(["--steps", "200", "--figure", str(tmp_path / "r.png")])
    assert "levels  bits/pixel" in capsys.readouterr().out
    psnr = [r["psnr"] for r in results["test"]]
    assert all(math.isfinite(p) for p in psnr)
    # On the held-out image: one level beats its mean colour, every extra level helps.
    assert psnr[0] > results["zero_bit_psnr"] + 1.0, psnr
    assert all(b > a for a, b in zip(psnr, psnr[1:])), psnr
    assert (tmp_path / "r.png").stat().st_size > 10_000
