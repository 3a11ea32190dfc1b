"""The FLOP count behind the MFU figures in BENCHMARKS.md (bench/bench_train.py)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_train  # noqa: E402


def _conv_step():
    """A conv's loss and weight gradient: forward conv + weight-gradient conv."""
    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
        return jnp.sum(y * y)

    x = jnp.ones((4, 1006, 64))  # [batch, time, channels]: 1000 output frames for 7 taps
    w = jnp.ones((7, 64, 128))
    lowered = jax.jit(jax.grad(loss, argnums=1)).lower(x, w)
    forward_flops = 2 * 4 * 1000 * 7 * 64 * 128  # a multiply-add is 2 FLOPs
    return lowered, forward_flops


def test_step_flops_counts_convolutions_forward_and_backward():
    lowered, forward = _conv_step()
    # The weight gradient is a second convolution of the same size; elementwise work is
    # small beside them.
    assert bench_train.step_flops(lowered) == pytest.approx(2 * forward, rel=2e-3)
    assert bench_train.step_flops(lowered, num_devices=4) == pytest.approx(2 * forward / 4, rel=2e-3)


def test_step_flops_falls_back_to_host_analysis_when_backend_has_none():
    """GPU plugins return no analysis for an unoptimised module; the fallback must count
    the same program the same way."""
    lowered, _ = _conv_step()

    class NoAnalysis:
        def cost_analysis(self):
            return None

        def compiler_ir(self, dialect):
            return lowered.compiler_ir(dialect)

    assert bench_train.step_flops(NoAnalysis()) == pytest.approx(bench_train.step_flops(lowered))
