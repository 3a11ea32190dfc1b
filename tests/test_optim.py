"""The training optimizer (codec_jax.training.optim): which parameters weight decay reaches."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from codec_jax.training import optim


@pytest.mark.parametrize("decay_vectors", [True, False])
def test_weight_decay_reaches_kernels_and_optionally_vectors(decay_vectors):
    lr, wd = 0.1, 0.5
    tx = optim.build_optimizer(optim.optimizer_config(learning_rate=lr, weight_decay=wd,
                                                      decay_rate=1.0, decay_vectors=decay_vectors))
    params = {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 2.0)}
    state = tx.init(params)
    zero_grads = {k: jnp.zeros_like(v) for k, v in params.items()}
    updates, _ = tx.update(zero_grads, state, params)
    # With zero gradients the Adam step is zero and only decoupled decay moves a parameter:
    # update = -lr * wd * p on the decayed ones.
    np.testing.assert_allclose(updates["kernel"], -lr * wd * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], -lr * wd * 2.0 if decay_vectors else 0.0, rtol=1e-6)
