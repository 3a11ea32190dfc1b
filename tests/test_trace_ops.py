"""The profile attribution behind bench/profile_train_step.py and profile_decode.py: which
XLA operation ran how long (a profiler trace), and what each one is (its scope and kind,
from the compiled HLO)."""

import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.profile_train_step import classify  # noqa: E402
from bench.trace_ops import device_time_by_op, hlo_instructions  # noqa: E402

HLO = """HloModule m

%fused_computation.1 (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  %sine.0 = f32[8]{0} sine(%p0), metadata={op_name="jit(f)/generator_forward/jvp(SNAC)/decoder/block_0/sin"}
  ROOT %multiply.0 = f32[8]{0} multiply(%sine.0, %sine.0), metadata={op_name="jit(f)/generator_forward/jvp(SNAC)/decoder/block_0/mul"}
}

ENTRY %main (a: f32[8], b: f32[8,8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %b = f32[8,8]{1,0} parameter(1)
  %fusion.1 = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_computation.1
  %custom-call.2 = f32[8]{0} custom-call(%fusion.1, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(f)/generator_backward/transpose(jvp(SNAC))/encoder/block_1/dot_general"}
  ROOT %copy.3 = f32[8]{0} copy(%custom-call.2)
}
"""


def test_hlo_instructions_names_scope_and_kind():
    info = hlo_instructions(HLO)
    # A fusion without metadata takes its fused computation's root scope.
    assert info["fusion.1"] == dict(
        op_name="jit(f)/generator_forward/jvp(SNAC)/decoder/block_0/mul", kind="kLoop")
    assert info["custom-call.2"]["kind"] == "__cublas$gemm"
    # An op whose metadata XLA dropped takes its first operand's.
    assert info["copy.3"]["op_name"] == info["custom-call.2"]["op_name"]
    assert classify(info["fusion.1"]["op_name"], 2) == dict(
        phase="generator_forward", direction="forward", module="decoder/block_0")
    assert classify(info["custom-call.2"]["op_name"], 1) == dict(
        phase="generator_backward", direction="backward", module="encoder")
    assert classify("jit(train_step)/generator_losses/jvp(fake_features)/Discriminator/"
                    "mpd_2/conv/conv_general_dilated", 2)["phase"] == "generator_losses/fake_features"
    assert classify("", 2) == dict(phase="other", direction="forward", module="(no module)")


def test_a_traced_run_is_attributed_to_its_phases():
    """Every traced op is found in the compiled HLO, and the time lands in the scopes that
    ran: the forward's ops under its scope, the backward's (a transpose) as backward."""

    def loss(w, x):
        return jnp.sum(jnp.sin(jnp.tanh(x @ w) @ w) ** 2)

    def step(w, x):  # as the train step: a forward kept as a VJP, pulled back later
        with jax.named_scope("generator_forward"):
            value, pullback = jax.vjp(lambda w: loss(w, x), w)
        with jax.named_scope("generator_backward"):
            (g,) = pullback(jnp.ones_like(value))
        return w - 0.1 * g

    x = jnp.ones((256, 256)) * 0.01
    w = jnp.eye(256)
    compiled = jax.jit(step).lower(w, x).compile()
    info = hlo_instructions(compiled.as_text())
    jax.block_until_ready(compiled(w, x))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(3):
                w = compiled(w, x)
            jax.block_until_ready(w)
        ops = device_time_by_op(d, 0)
    assert ops, "no operation in the trace"
    assert all(name in info for name, _, _ in ops), [n for n, _, _ in ops if n not in info]
    phases = {}
    for name, ms, _ in ops:
        c = classify(info[name]["op_name"], 1)
        phases[(c["phase"], c["direction"])] = phases.get((c["phase"], c["direction"]), 0) + ms
    assert phases.get(("generator_forward", "forward"), 0) > 0, phases
    assert phases.get(("generator_backward", "backward"), 0) > 0, phases
