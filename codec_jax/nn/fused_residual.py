"""SNAC's residual unit as one Pallas (Triton) kernel on the GPU (issue 16).

A residual unit is `x + W2 snake_2(dw(snake_1(x)))` with `dw` a 7-tap depthwise conv of
dilation d and `W2` a 1x1 conv. XLA runs it as three or four passes over HBM (Snake
materialised, the taps with the second Snake, the matmul, the skip add): on an H200 those
passes were 60 % of the decoder's time, each well below the memory bandwidth (BENCHMARKS
§1b). This kernel reads `x` once (each of the 7 shifted tiles hits L1/L2), computes both
Snakes, the taps and the 1x1 matmul (tensor cores) in registers and writes the result once.
Measured on an H200 it is 2.3x *slower* than XLA's passes (each tap is a masked gather of
a whole tile followed by its own Snake; BENCHMARKS §1b), so it is off by default
(`layers.set_lowering(residual_unit="pallas")` turns it on): a tested starting point for a
kernel that loads one haloed tile and takes the taps from shared memory.

It reproduces the XLA path's roundings (`layers.ResidualUnit` with bfloat16 activations:
Snake in float32 rounded to bfloat16, taps accumulated in float32, biases added in
bfloat16), so the two agree to accumulation order. The backward pass is the XLA path's
(`jax.custom_vjp` around `residual_unit_reference`): training through it is exact.

Shapes: `x` `[batch, time, channels]`; `dw_kernel` `[7, channels]`; `pw_kernel`
`[channels, channels]` (in, out); biases and Snake alphas `[channels]`; `valid` int32
`[batch]` (steps of each row that hold signal; None: all).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from codec_jax.nn import layers

Array = jax.Array

# Channels up to this (padded to a power of two) fit one [block_time, channels] tile and a
# [channels, channels] weight in one program; wider units (the decoder's first blocks, a
# fifth of its elementwise work) stay on the XLA path.
MAX_CHANNELS = 256
TAPS = 7
# Tile and warps of the kernel (`block_time`, `num_warps` of `fused_residual_unit`): of those
# measured on an H200 (bench/check_fused_residual.py, BENCHMARKS §1b) 16x4 and 32x4 were the
# fastest; 128-step tiles took Triton 30-38 s to compile per unit.
DEFAULT_TUNING = {"block_time": 32, "num_warps": 4}
TUNING = dict(DEFAULT_TUNING)
# The stack form's tile (`fused_residual_stack`): a guess until measured on a GPU; with
# one tap load per tap (no Snake in the tap loop) larger tiles amortise the [C, C] weight
# each program loads.
DEFAULT_STACK_TUNING = {"block_time": 64, "num_warps": 4}
STACK_TUNING = dict(DEFAULT_STACK_TUNING)
# Triton computes flat offsets in int32.
_MAX_ELEMENTS = 2**31 - 1


def supported(x_shape, dtype, kernel_size: int, groups: int, any_backend: bool = False) -> bool:
    """Whether `fused_residual_unit` handles a unit of this shape (on this backend, unless
    `any_backend`: the interpreter runs anywhere)."""
    batch, time, channels = x_shape
    return ((any_backend or jax.default_backend() == "gpu") and jnp.dtype(dtype) == jnp.bfloat16
            and kernel_size == TAPS and groups == channels <= MAX_CHANNELS
            and batch * time * channels <= _MAX_ELEMENTS)


def _snake(x: Array, alpha: Array, inv_alpha: Array) -> Array:
    """`layers.snake`'s float32 arithmetic on float32 `x`, alpha and 1/(alpha+1e-9) given."""
    return x + inv_alpha * layers.sin_squared(alpha * x)


def residual_unit_reference(x, alpha_1, dw_kernel, dw_bias, alpha_2, pw_kernel, pw_bias,
                            dilation: int, valid: Optional[Array] = None) -> Array:
    """The XLA path of `layers.ResidualUnit` (depthwise, 7 taps) as a function of its
    weights (weight norm already applied): the kernel's specification and its backward."""
    dtype = x.dtype
    y = layers.snake(layers.apply_mask(x, valid), alpha_1, dtype)
    y = layers._depthwise_conv(y, dw_kernel.astype(dtype), 3 * dilation, dilation)
    y = layers.snake(y + dw_bias.astype(dtype), alpha_2, dtype)
    y = jnp.einsum("bti,io->bto", y, pw_kernel.astype(dtype)) + pw_bias.astype(dtype)
    return x + y


def _unit_output(acc, bdw_ref, a2_ref, inv2_ref, w_ref, bpw_ref, dtype):
    """Both kernels' epilogue: float32 `[tile, padded]` tap sums -> the unit's branch
    (depthwise bias, second Snake, 1x1 matmul, its bias) in float32, with the XLA path's
    roundings to `dtype` between the steps."""
    f32 = jnp.float32
    y = (acc.astype(dtype).astype(f32) + bdw_ref[...][None, :]).astype(dtype).astype(f32)
    y = _snake(y, a2_ref[...][None, :], inv2_ref[...][None, :]).astype(dtype)
    y = jnp.dot(y, w_ref[...], preferred_element_type=f32)
    return (y.astype(dtype).astype(f32) + bpw_ref[...][None, :]).astype(dtype).astype(f32)


def _kernel(valid_ref, x_ref, a1_ref, inv1_ref, kdw_ref, bdw_ref, a2_ref, inv2_ref,
            w_ref, bpw_ref, o_ref, *, time: int, channels: int, padded: int,
            block_time: int, dilation: int):
    from jax.experimental.pallas import triton as plgpu

    dtype = o_ref.dtype
    f32 = jnp.float32
    row, block = pl.program_id(0), pl.program_id(1)
    n_valid = valid_ref[row]
    c = jnp.arange(padded)
    c_in = c < channels
    t = block * block_time + jnp.arange(block_time)
    a1, inv1 = a1_ref[...], inv1_ref[...]
    acc = jnp.zeros((block_time, padded), f32)
    skip = None
    for j in range(TAPS):
        tj = t + (j - TAPS // 2) * dilation
        inside = (tj >= 0) & (tj < time)
        xj = plgpu.load(x_ref.at[(row * time + tj)[:, None], c[None, :]],
                        mask=inside[:, None] & c_in[None, :], other=0.0).astype(f32)
        if j == TAPS // 2:
            skip = xj
        # Beyond the row's valid steps the unit sees zeros (its own padding), and Snake(0) = 0.
        xj = jnp.where((tj < n_valid)[:, None], xj, 0.0)
        acc = acc + _snake(xj, a1, inv1).astype(dtype).astype(f32) * kdw_ref[j, :][None, :]
    y = _unit_output(acc, bdw_ref, a2_ref, inv2_ref, w_ref, bpw_ref, dtype)
    out = (skip + y).astype(dtype)
    plgpu.store(o_ref.at[(row * time + t)[:, None], c[None, :]], out,
                mask=(t < time)[:, None] & c_in[None, :])


def _padded_channels(channels: int) -> int:
    return max(16, pl.next_power_of_2(channels))  # tensor-core dots need >= 16


def _row_lengths(valid: Optional[Array], batch: int, time: int) -> Array:
    return (jnp.full((batch,), time, jnp.int32) if valid is None
            else jnp.asarray(valid, jnp.int32))


def _padded_weights(weights, channels: int, padded: int, dtype):
    """The kernels' operands from one unit's weights: float32 vectors of the dtype-rounded
    values (the XLA path rounds weights to the activation dtype), zero in the padding."""
    alpha_1, dw_kernel, dw_bias, alpha_2, pw_kernel, pw_bias = weights
    f32 = jnp.float32
    as_dtype = lambda v: v.astype(dtype).astype(f32)
    vec = lambda v: jnp.pad(as_dtype(v), (0, padded - channels))
    a1, a2 = vec(alpha_1), vec(alpha_2)
    return dict(
        a1=a1, inv1=jnp.reciprocal(a1 + 1e-9), a2=a2, inv2=jnp.reciprocal(a2 + 1e-9),
        kdw=jnp.pad(as_dtype(dw_kernel), ((0, 0), (0, padded - channels))),
        bdw=vec(dw_bias), bpw=vec(pw_bias),
        w=jnp.pad(pw_kernel.astype(dtype), ((0, padded - channels), (0, padded - channels))))


def _forward(x, alpha_1, dw_kernel, dw_bias, alpha_2, pw_kernel, pw_bias, valid, *,
             dilation: int, block_time: int, num_warps: int, interpret: bool) -> Array:
    from jax.experimental.pallas import triton as plgpu

    batch, time, channels = x.shape
    dtype = x.dtype
    padded = _padded_channels(channels)
    op = _padded_weights((alpha_1, dw_kernel, dw_bias, alpha_2, pw_kernel, pw_bias),
                         channels, padded, dtype)
    valid = _row_lengths(valid, batch, time)
    kernel = functools.partial(_kernel, time=time, channels=channels, padded=padded,
                               block_time=block_time, dilation=dilation)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch * time, channels), dtype),
        grid=(batch, pl.cdiv(time, block_time)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret,
        name=f"residual_unit_d{dilation}_c{channels}",
    )(valid, x.reshape(batch * time, channels), op["a1"], op["inv1"], op["kdw"], op["bdw"],
      op["a2"], op["inv2"], op["w"], op["bpw"])
    return out.reshape(batch, time, channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _fused(x, alpha_1, dw_kernel, dw_bias, alpha_2, pw_kernel, pw_bias, valid,
           dilation, block_time, num_warps, interpret):
    return _forward(x, alpha_1, dw_kernel, dw_bias, alpha_2, pw_kernel, pw_bias, valid,
                    dilation=dilation, block_time=block_time, num_warps=num_warps,
                    interpret=interpret)


def _fused_fwd(x, alpha_1, dw_kernel, dw_bias, alpha_2, pw_kernel, pw_bias, valid,
               dilation, block_time, num_warps, interpret):
    out = _forward(x, alpha_1, dw_kernel, dw_bias, alpha_2, pw_kernel, pw_bias, valid,
                   dilation=dilation, block_time=block_time, num_warps=num_warps,
                   interpret=interpret)
    return out, (x, alpha_1, dw_kernel, dw_bias, alpha_2, pw_kernel, pw_bias, valid)


def _fused_bwd(dilation, block_time, num_warps, interpret, residuals, g):
    *weights, valid = residuals
    _, vjp = jax.vjp(lambda *w: residual_unit_reference(*w, dilation=dilation, valid=valid),
                     *weights)
    grads = vjp(g)
    valid_grad = None if valid is None else jnp.zeros(valid.shape, jax.dtypes.float0)
    return (*grads, valid_grad)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_residual_unit(x: Array, alpha_1: Array, dw_kernel: Array, dw_bias: Array,
                        alpha_2: Array, pw_kernel: Array, pw_bias: Array, dilation: int,
                        valid: Optional[Array] = None, *, block_time: int = 32,
                        num_warps: int = 4, interpret: bool = False) -> Array:
    """`residual_unit_reference(...)` as one kernel; x `[batch, time, channels]` -> same shape.

    `interpret=True` runs the kernel in Pallas's interpreter (any backend: the tests)."""
    if dw_kernel.shape != (TAPS, x.shape[-1]) or pw_kernel.shape != (x.shape[-1],) * 2:
        raise ValueError(f"fused residual unit: x {x.shape}, depthwise kernel {dw_kernel.shape}, "
                         f"pointwise kernel {pw_kernel.shape}: want [{TAPS}, C] and [C, C]")
    return _fused(x, alpha_1, dw_kernel, dw_bias, alpha_2, pw_kernel, pw_bias, valid,
                  dilation, block_time, num_warps, interpret)


# ------------------------------------------------------------------------- the stack form
# A block's three residual units (dilations 1, 3, 9) as one kernel call each, with the
# first Snake moved out of the tap loop. The unit kernel above applies Snake to each of
# the 7 shifted tiles it loads (7 Snakes per element: most of its arithmetic); here each
# call takes `s = snake_1(x)` already computed and, in its epilogue, writes the *next*
# unit's `snake_1` of its own output beside that output. Per unit: two reads (s, x; the
# 7 taps of s hit L1/L2) and two writes (y, s_next), against XLA's four passes each way
# (Snake + skip add, taps + second Snake, the 1x1 matmul). Only the stack's first Snake
# runs as an XLA fusion.

def unit_weights(params) -> tuple[Array, ...]:
    """(alpha_1, dw_kernel [7, C], dw_bias, alpha_2, pw_kernel [C, C], pw_bias) of one
    `layers.ResidualUnit`'s parameters, weight norm applied as `WNConv1d` applies it."""
    def kernel(conv):  # the weight-normed `[kernel, in/groups, out]`
        return layers.weight_norm(params[conv]["direction"], params[conv]["magnitude"],
                                  norm_axes=(0, 1), mag_axis=2)

    return (params["snake_1"]["alpha"], kernel("conv_dilated")[:, 0, :],
            params["conv_dilated"]["bias"], params["snake_2"]["alpha"],
            kernel("conv_pointwise")[0], params["conv_pointwise"]["bias"])


def residual_stack_reference(x: Array, units: tuple, dilations: tuple[int, ...],
                             valid: Optional[Array] = None) -> Array:
    """The XLA path of consecutive residual units (`units[i]` as `unit_weights` gives
    them): the stack kernel's specification and its backward."""
    for weights, dilation in zip(units, dilations):
        x = residual_unit_reference(x, *weights, dilation=dilation, valid=valid)
    return x


def _stack_kernel(valid_ref, s_ref, x_ref, kdw_ref, bdw_ref, a2_ref, inv2_ref, w_ref, bpw_ref,
                  an_ref, invn_ref, o_ref, *next_ref, time: int, channels: int, padded: int,
                  block_time: int, dilation: int):
    from jax.experimental.pallas import triton as plgpu

    dtype = o_ref.dtype
    f32 = jnp.float32
    row, block = pl.program_id(0), pl.program_id(1)
    c = jnp.arange(padded)
    c_in = c < channels
    t = block * block_time + jnp.arange(block_time)
    acc = jnp.zeros((block_time, padded), f32)
    for j in range(TAPS):
        tj = t + (j - TAPS // 2) * dilation
        inside = (tj >= 0) & (tj < time)
        # s is zero beyond each row's valid steps already (Snake(0) = 0 of the masked input).
        sj = plgpu.load(s_ref.at[(row * time + tj)[:, None], c[None, :]],
                        mask=inside[:, None] & c_in[None, :], other=0.0).astype(f32)
        acc = acc + sj * kdw_ref[j, :][None, :]
    y = _unit_output(acc, bdw_ref, a2_ref, inv2_ref, w_ref, bpw_ref, dtype)
    here = (t < time)[:, None] & c_in[None, :]
    skip = plgpu.load(x_ref.at[(row * time + t)[:, None], c[None, :]], mask=here,
                      other=0.0).astype(f32)
    out = (skip + y).astype(dtype)
    plgpu.store(o_ref.at[(row * time + t)[:, None], c[None, :]], out, mask=here)
    if next_ref:  # the next unit's first Snake of this output, zero beyond the valid steps
        s_next = _snake(out.astype(f32), an_ref[...][None, :], invn_ref[...][None, :])
        s_next = jnp.where((t < valid_ref[row])[:, None], s_next, 0.0).astype(dtype)
        plgpu.store(next_ref[0].at[(row * time + t)[:, None], c[None, :]], s_next, mask=here)


def _stack_forward(x, units, valid, *, dilations, block_time, num_warps, interpret):
    from jax.experimental.pallas import triton as plgpu

    batch, time, channels = x.shape
    dtype = x.dtype
    padded = _padded_channels(channels)
    ops = [_padded_weights(w, channels, padded, dtype) for w in units]
    valid = _row_lengths(valid, batch, time)
    # The first unit's Snake, as the XLA path computes it.
    s = layers.snake(layers.apply_mask(x, valid), units[0][0], dtype)
    flat = lambda a: a.reshape(batch * time, channels)
    x, s = flat(x), flat(s)
    for i, (op, dilation) in enumerate(zip(ops, dilations)):
        has_next = i + 1 < len(ops)
        nxt = ops[i + 1] if has_next else op  # unused without a next unit
        kernel = functools.partial(_stack_kernel, time=time, channels=channels, padded=padded,
                                   block_time=block_time, dilation=dilation)
        shape = jax.ShapeDtypeStruct((batch * time, channels), dtype)
        outs = pl.pallas_call(
            kernel,
            out_shape=(shape, shape) if has_next else (shape,),
            grid=(batch, pl.cdiv(time, block_time)),
            compiler_params=plgpu.CompilerParams(num_warps=num_warps),
            interpret=interpret,
            name=f"residual_stack_d{dilation}_c{channels}",
        )(valid, s, x, op["kdw"], op["bdw"], op["a2"], op["inv2"], op["w"], op["bpw"],
          nxt["a1"], nxt["inv1"])
        x = outs[0]
        s = outs[1] if has_next else None
    return x.reshape(batch, time, channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _stack(x, units, valid, dilations, block_time, num_warps, interpret):
    return _stack_forward(x, units, valid, dilations=dilations, block_time=block_time,
                          num_warps=num_warps, interpret=interpret)


def _stack_fwd(x, units, valid, dilations, block_time, num_warps, interpret):
    return _stack(x, units, valid, dilations, block_time, num_warps, interpret), (x, units, valid)


def _stack_bwd(dilations, block_time, num_warps, interpret, residuals, g):
    x, units, valid = residuals
    _, vjp = jax.vjp(lambda x, u: residual_stack_reference(x, u, dilations, valid), x, units)
    gx, gu = vjp(g)
    valid_grad = None if valid is None else jnp.zeros(valid.shape, jax.dtypes.float0)
    return gx, gu, valid_grad


_stack.defvjp(_stack_fwd, _stack_bwd)


def fused_residual_stack(x: Array, units: tuple, dilations: tuple[int, ...],
                         valid: Optional[Array] = None, *, block_time: int = 64,
                         num_warps: int = 4, interpret: bool = False) -> Array:
    """`residual_stack_reference(x, units, dilations, valid)` as one kernel per unit (see
    above); x `[batch, time, channels]` bfloat16 -> same shape. `units`: a tuple of
    `unit_weights` tuples, one per dilation. `interpret=True` runs the kernels in Pallas's
    interpreter (any backend: the tests)."""
    channels = x.shape[-1]
    units = tuple(tuple(w) for w in units)
    if len(units) != len(dilations) or not units:
        raise ValueError(f"fused residual stack: {len(units)} units for dilations {dilations}")
    for w in units:
        if w[1].shape != (TAPS, channels) or w[4].shape != (channels, channels):
            raise ValueError(f"fused residual stack: x {x.shape}, depthwise kernel "
                             f"{w[1].shape}, pointwise kernel {w[4].shape}: want "
                             f"[{TAPS}, C] and [C, C]")
    return _stack(x, units, valid, tuple(int(d) for d in dilations), int(block_time),
                  int(num_warps), bool(interpret))
