"""The time-series compression example runs (small) and its figures make sense."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "timeseries_rvq.py"


def load_example():
    spec = importlib.util.spec_from_file_location("timeseries_rvq", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # flax modules are dataclasses, which look themselves up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_timeseries_example_runs_and_more_levels_cost_more_bits_and_reconstruct_better(capsys):
    pytest.importorskip("statsmodels")
    results = load_example().main(["--steps", "120"])
    table = capsys.readouterr().out
    assert "levels  bits/quarter" in table
    train, test = results["train"], results["test"]
    assert [r["levels"] for r in test] == [1, 2, 3, 4]
    # 16, 32, 64, 64 codes at strides 4, 2, 1, 1: 4/4, +5/2, +6, +6 bits per quarter.
    assert [r["bits_per_quarter"] for r in test] == pytest.approx([1.0, 3.5, 9.5, 15.5])
    assert all(math.isfinite(r["mse"]) for r in train + test)
    # In-sample, every extra level helps and one level already beats the zero-bit mean.
    mse = [r["mse"] for r in train]
    assert mse[0] < results["zero_bit_mse"]["train"]
    assert all(b < a for a, b in zip(mse, mse[1:])), mse
    assert test[-1]["mse"] < results["zero_bit_mse"]["test"]
