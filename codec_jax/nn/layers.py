"""SNAC building blocks in flax.linen, channels-last: activations are `[batch, time, channels]`.

Weight-normalised convolutions keep PyTorch's `weight_norm(dim=0)` parametrisation
(`weight = magnitude * direction / ||direction||`, the norm taken over every axis but
PyTorch's dim 0) so that checkpoints import one-to-one and training sees the same
optimisation geometry as the reference. Parameters are stored in `param_dtype`
(float32); arithmetic runs in `dtype` (float32 or bfloat16).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any
Array = jax.Array

# How some layers are lowered; every choice computes the same function (tests/test_layers.py
# checks each against the other). Read when a function is traced: change them with
# `set_lowering`, which also drops the traced functions. The defaults are the fastest
# measured (BENCHMARKS §1b):
# - "conv_transpose": "polyphase" (`polyphase_conv_transpose`: one ordinary conv with
#   `stride*out` channels) or "xla" (XLA's conv over the stride-dilated input, which the
#   GPU runs as cuDNN's backward-data conv and autotunes for minutes at float32 batch 64);
# - "pointwise": 1x1 convs as "dot" (a matmul) or "conv";
# - "elementwise_f32": Snake and the depthwise taps computed in float32 for bfloat16
#   activations (see `_elementwise_dtype`);
# - "snake_sine": Snake's sin^2 as "polynomial" (`sin_squared`) or "jnp" (`jnp.sin`);
# - "residual_unit": "xla" (the modules below) or "pallas" (`fused_residual`: one Triton
#   kernel per depthwise bfloat16 unit of <= 256 channels on a GPU, the XLA path
#   elsewhere; measured 2.3x slower than "xla", hence not the default); "pallas_stack"
#   (`fused_residual.fused_residual_stack`: a block's three units, each one Triton kernel
#   that takes its first Snake precomputed and writes the next unit's; not measured on a
#   GPU yet, hence not the default); the "_interpret" forms run those kernels in Pallas's
#   interpreter on any backend (slow: for tests).
# - "polyphase_weight_grad": how the polyphase conv's weight gradient is computed: "conv"
#   (XLA's weight-gradient convolution), "dot" (one matmul per tap, `_taps_conv_dot_grad`)
#   or "auto" (the default: "dot" on the CPU, where XLA's weight-gradient convolution over
#   the whole time axis took 40.8 ms against 0.7 ms for the tiny decoder's first block,
#   BENCHMARKS §4; "conv" elsewhere, as measured there).
IMPL = {"conv_transpose": "polyphase", "pointwise": "dot", "elementwise_f32": True,
        "snake_sine": "polynomial", "residual_unit": "xla", "polyphase_weight_grad": "auto"}
_IMPL_CHOICES = {"conv_transpose": ("polyphase", "xla"), "pointwise": ("dot", "conv"),
                 "elementwise_f32": (True, False), "snake_sine": ("polynomial", "jnp"),
                 "residual_unit": ("xla", "pallas", "pallas_interpret", "pallas_stack",
                                   "pallas_stack_interpret"),
                 "polyphase_weight_grad": ("auto", "conv", "dot")}


def set_lowering(**choices) -> None:
    """Set entries of `IMPL` (checked against the known choices) and drop JAX's caches, so
    that functions traced from now on use them (benchmarks and tests compare them)."""
    for key, value in choices.items():
        if value not in _IMPL_CHOICES.get(key, ()):
            raise ValueError(f"lowering {key}={value!r}: choose {key} from "
                             f"{_IMPL_CHOICES.get(key)} (keys: {sorted(_IMPL_CHOICES)})")
    IMPL.update(choices)
    jax.clear_caches()


def torch_uniform_init(fan_in: int):
    """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Every layer of the codec and the discriminators starts from it (the references never
    override it, and weight norm makes the initial scale part of the parametrisation).
    """
    bound = 1.0 / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def weight_norm(direction: Array, magnitude: Array, norm_axes: Sequence[int], mag_axis: int) -> Array:
    """`magnitude * direction / ||direction||` with the norm over `norm_axes` (float32).

    `magnitude` has one entry per slice of `direction` along `mag_axis`.
    """
    direction = direction.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(direction), axis=tuple(norm_axes), keepdims=True))
    shape = [1] * direction.ndim
    shape[mag_axis] = -1
    return direction * (magnitude.astype(jnp.float32).reshape(shape) / norm)


def weight_normed_kernel(module: nn.Module, shape: Sequence[int], fan_in: int,
                         norm_axes: Sequence[int], mag_axis: int,
                         param_dtype: Dtype = jnp.float32) -> Array:
    """Create `direction` (`shape`, torch init) and `magnitude` (`[shape[mag_axis]]`, initialised
    to the direction's norm as `torch.nn.utils.weight_norm` does) in `module`'s scope and
    return the float32 kernel `magnitude * direction / ||direction||`.

    Call it from inside a compact `__call__`. The one place where weight norm's parameters
    are defined, for the 1-D, transposed and 2-D convolutions alike.
    """
    direction = module.param("direction", torch_uniform_init(fan_in), tuple(shape), param_dtype)
    magnitude = module.param(
        "magnitude",
        lambda _key: jnp.sqrt(jnp.sum(jnp.square(direction.astype(jnp.float32)),
                                      axis=tuple(norm_axes))).astype(param_dtype),
    )
    return weight_norm(direction, magnitude, norm_axes=norm_axes, mag_axis=mag_axis)


def time_mask(valid: Optional[Array], time: int, dtype: Dtype) -> Optional[Array]:
    """`[batch, time, 1]` of ones on each item's first `valid[b]` steps, zeros after; None
    when `valid` is None (no masking: every row is fully valid).

    Multiplying an activation by it before a layer that mixes time steps makes that layer
    see zeros beyond the item's end, which is exactly what the item's own zero padding
    shows it when it is coded alone.
    """
    if valid is None:
        return None
    return (jnp.arange(time)[None, :] < valid[:, None])[..., None].astype(dtype)


def apply_mask(x: Array, valid: Optional[Array]) -> Array:
    """x `[batch, time, channels]` with the steps at and beyond `valid[b]` zeroed (no-op for None).

    A select rather than a multiply, so that whatever the padding holds (even inf/NaN)
    cannot leak into the valid steps; XLA fuses it into the neighbouring elementwise ops.
    """
    mask = time_mask(valid, x.shape[1], jnp.bool_)
    return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


class WNConv1d(nn.Module):
    """Weight-normalised 1-D convolution with PyTorch's `Conv1d` semantics.

    Parameters: `direction` `[kernel, in/groups, out]`, `magnitude` `[out]` (initialised to
    the norm of the direction, as `torch.nn.utils.weight_norm` does), `bias` `[out]`.
    Input `[batch, time, in]` -> `[batch, time', out]` with
    `time' = (time + 2*padding - dilation*(kernel-1) - 1) // stride + 1`.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        if in_features % self.groups or self.features % self.groups:
            raise ValueError(
                f"{self.name}: channels in={in_features} out={self.features} "
                f"not divisible by groups={self.groups}"
            )
        fan_in = in_features // self.groups * self.kernel_size
        kernel = weight_normed_kernel(
            self, (self.kernel_size, in_features // self.groups, self.features), fan_in,
            norm_axes=(0, 1), mag_axis=2, param_dtype=self.param_dtype).astype(self.dtype)
        x = x.astype(self.dtype)
        if self.groups == in_features == self.features and self.stride == 1:
            y = _depthwise_conv(x, kernel[:, 0, :], self.padding, self.dilation)
        elif (self.kernel_size == 1 and self.stride == 1 and self.groups == 1 and self.padding == 0
              and IMPL["pointwise"] == "dot"):
            y = jnp.einsum("bti,io->bto", x, kernel[0], precision=self.precision)
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(self.stride,),
                padding=[(self.padding, self.padding)],
                rhs_dilation=(self.dilation,),
                dimension_numbers=("NWC", "WIO", "NWC"),
                feature_group_count=self.groups,
                precision=self.precision,
            )
        if self.use_bias:
            bias = self.param("bias", torch_uniform_init(fan_in), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _depthwise_conv(x: Array, kernel: Array, padding: int, dilation: int) -> Array:
    """Depthwise conv as a sum of shifted, per-channel-scaled copies of the input.

    x `[batch, time, channels]`, kernel `[taps, channels]`. SNAC's residual units are
    depthwise with 7 taps: as a grouped convolution XLA hands them to a slow generic kernel,
    while this form fuses (with the Snake around it) into one memory-bound pass.
    """
    taps = kernel.shape[0]
    dtype = x.dtype
    compute = _elementwise_dtype(dtype)
    x = jnp.pad(x, ((0, 0), (padding, padding), (0, 0))).astype(compute)
    kernel = kernel.astype(compute)
    out_len = x.shape[1] - dilation * (taps - 1)
    y = x[:, :out_len] * kernel[0]
    for j in range(1, taps):
        y = y + x[:, j * dilation: j * dilation + out_len] * kernel[j]
    return y.astype(dtype)


def _elementwise_dtype(dtype: Dtype) -> Dtype:
    """The dtype that fused elementwise chains (Snake, the depthwise taps) compute in.

    float32 for bfloat16 activations: memory traffic stays bfloat16, while each op in
    bfloat16 would be widened, computed and rounded back on its own (GPUs have no bf16 sin,
    and XLA keeps every intermediate rounding), which made these fusions compute-bound at
    a quarter of the memory bandwidth on an H200 (BENCHMARKS §1b). One rounding at the end
    is also closer to the float32 model."""
    return jnp.promote_types(dtype, jnp.float32) if IMPL["elementwise_f32"] else dtype


def snake(x: Array, alpha: Array, dtype: Dtype) -> Array:
    """Snake `x + sin(alpha*x)^2 / alpha` on x `[..., channels]`, alpha `[channels]`, result in `dtype`."""
    compute = _elementwise_dtype(dtype)
    alpha = alpha.astype(dtype).astype(compute)
    x = x.astype(dtype).astype(compute)
    u = alpha * x
    sin2 = sin_squared(u) if IMPL["snake_sine"] == "polynomial" else jnp.square(jnp.sin(u))
    # 1e-9 as in SNAC/DAC: keeps a zero alpha finite without changing trained models.
    return (x + jnp.reciprocal(alpha + 1e-9) * sin2).astype(dtype)


# pi as a sum of three float32 constants (Cody-Waite): k*pi is then exact enough that the
# reduced argument keeps float32 accuracy for |u| up to ~1e4 (k < 2^12).
_PI_HI = 3.140625
_PI_MID = 9.67502593994140625e-4
_PI_LO = 1.509957990978376e-07
# Taylor coefficients of sin(r)/r - 1 in r^2, degree 11: truncation error < 6e-8 on |r| <= pi/2.
_SIN_COEFFS = (-1.0 / 6, 1.0 / 120, -1.0 / 5040, 1.0 / 362880, -1.0 / 39916800)


def sin_squared(u: Array) -> Array:
    """sin(u)^2 for float32 u, to within ~3e-7 of the exact value for |u| < 1e3.

    Squaring removes the sign of sin, so one reduction by multiples of pi (not 2*pi, and no
    quadrant logic) and an odd polynomial on [-pi/2, pi/2] suffice: a dozen multiply-adds
    against the general `sin`, whose range reduction for any float made Snake the
    arithmetic bottleneck of the codec's fused elementwise passes (BENCHMARKS §1b).
    NaN and inf give NaN, as `jnp.sin` does."""
    dtype = u.dtype
    u = u.astype(jnp.promote_types(dtype, jnp.float32))  # the constants need float32
    # floor(. + 0.5) rather than round: the same reduction, and Triton lowers floor (the
    # Pallas residual unit, `fused_residual.py`, shares this function).
    k = jnp.floor(u * (1.0 / math.pi) + 0.5)
    r = ((u - k * _PI_HI) - k * _PI_MID) - k * _PI_LO
    r2 = r * r
    p = _SIN_COEFFS[-1]
    for c in _SIN_COEFFS[-2::-1]:
        p = p * r2 + c
    s = r + r * r2 * p
    return (s * s).astype(dtype)


class WNConvTranspose1d(nn.Module):
    """Weight-normalised transposed 1-D convolution with PyTorch's `ConvTranspose1d` semantics.

    PyTorch stores the weight as `[in, out/groups, kernel]` and `weight_norm(dim=0)` gives it
    one magnitude per *input* channel; we keep that: `direction` `[kernel, in, out/groups]`,
    `magnitude` `[in]`, `bias` `[out]`. Output length is
    `(time - 1)*stride - 2*padding + dilation*(kernel-1) + output_padding + 1`.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    output_padding: int = 0
    dilation: int = 1
    groups: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        g = self.groups
        if in_features % g or self.features % g:
            raise ValueError(f"{self.name}: channels not divisible by groups={g}")
        # PyTorch computes fan_in of a transposed conv from weight.size(1) * kernel.
        fan_in = self.features // g * self.kernel_size
        w = weight_normed_kernel(self, (self.kernel_size, in_features, self.features // g), fan_in,
                                 norm_axes=(0, 2), mag_axis=1,
                                 param_dtype=self.param_dtype)  # [k, in, out/g]
        if g == 1 and self.dilation == 1 and IMPL["conv_transpose"] == "polyphase":
            y = polyphase_conv_transpose(x.astype(self.dtype), w.astype(self.dtype), self.stride,
                                         self.padding, self.output_padding, self.precision)
        else:
            y = _dilated_conv_transpose(x.astype(self.dtype), w.astype(self.dtype), self.stride,
                                        self.padding, self.output_padding, self.dilation, g,
                                        self.precision)
        if self.use_bias:
            bias = self.param("bias", torch_uniform_init(fan_in), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _dilated_conv_transpose(x: Array, w: Array, stride: int, padding: int, output_padding: int,
                            dilation: int, groups: int, precision: Any) -> Array:
    """PyTorch's `conv_transpose1d` as XLA's conv over the stride-dilated input.

    x `[batch, time, in]`, w `[kernel, in, out/groups]` -> `[batch, time', out]`. The kernel is
    flipped in time and in/out swapped per group: kernel[k', i, g*out_g + j] = w[K-1-k', g*in_g + i, j].
    """
    k, in_features, out_g = w.shape
    in_g = in_features // groups
    w = w[::-1].reshape(k, groups, in_g, out_g)
    w = jnp.transpose(w, (0, 2, 1, 3)).reshape(k, in_g, groups * out_g)
    edge = dilation * (k - 1) - padding
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(1,), padding=[(edge, edge + output_padding)],
        lhs_dilation=(stride,), rhs_dilation=(dilation,),
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups, precision=precision)


def polyphase_conv_transpose(x: Array, w: Array, stride: int, padding: int, output_padding: int,
                             precision: Any = None) -> Array:
    """PyTorch's `conv_transpose1d` (groups 1, dilation 1) as one ordinary convolution.

    x `[batch, time, in]`, w `[kernel, in, out]` -> `[batch, L, out]` with
    `L = (time-1)*stride - 2*padding + kernel + output_padding`.

    Uncropped output step `n = q*stride + r` sees only inputs `x[q - j]`, through kernel tap
    `r + j*stride` (j < J = ceil(kernel/stride)). So all `stride` phases of step q come out
    of one J-tap conv with `stride*out` output channels, reshaped to time: the transposed
    conv's own FLOP count, in the form GPUs and CPUs run best (a dense conv with many
    channels), instead of a conv over an input made of mostly inserted zeros. The first
    `padding` steps are then cropped.
    """
    kernel, cin, cout = w.shape
    time = x.shape[1]
    taps = -(-kernel // stride)
    length = (time - 1) * stride - 2 * padding + kernel + output_padding
    w = jnp.pad(w, ((0, taps * stride - kernel), (0, 0), (0, 0)))
    # kern[t, i, r*out + o] = w[r + (J-1-t)*stride, i, o]: tap t of the conv reads x[q - (J-1-t)].
    kern = jnp.transpose(w.reshape(taps, stride, cin, cout)[::-1], (0, 2, 1, 3))
    choice = IMPL["polyphase_weight_grad"]
    by_dot = choice == "dot" or (choice == "auto" and jax.default_backend() == "cpu")
    conv = _taps_conv_dot_grad if by_dot else _taps_conv
    z = conv(x, kern.reshape(taps, cin, stride * cout), taps - 1, precision)
    # z: [batch, time + J - 1, stride*out]
    full = z.reshape(x.shape[0], (time + taps - 1) * stride, cout)
    short = padding + length - full.shape[1]  # only when output_padding reaches past the end
    if short > 0:
        full = jnp.pad(full, ((0, 0), (0, short), (0, 0)))
    return full[:, padding:padding + length]


def _taps_conv(x: Array, kernel: Array, pad: int, precision: Any) -> Array:
    """x `[batch, time, in]` conv kernel `[taps, in, out]`, `pad` zeros on both sides."""
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1,), padding=[(pad, pad)],
        dimension_numbers=("NWC", "WIO", "NWC"), precision=precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _taps_conv_dot_grad(x: Array, kernel: Array, pad: int, precision: Any) -> Array:
    """`_taps_conv` whose kernel gradient is one matmul per tap,
    `dk[t] = sum over batch and time of x_padded[:, t:t + T_out]^T g`, instead of XLA's
    weight-gradient convolution, a convolution whose window is the whole time axis.

    Written as a JVP, so that forward-mode autodiff still works: the kernel's tangent
    enters as one matmul per tap, and reverse mode transposes those matmuls into the
    weight gradient; the input's tangent goes through the convolution as before (its
    transpose is XLA's input gradient). Same values up to summation order."""
    return _taps_conv(x, kernel, pad, precision)


@functools.partial(_taps_conv_dot_grad.defjvp, symbolic_zeros=True)
def _taps_conv_jvp(pad, precision, primals, tangents):
    x, kernel = primals
    dx, dk = tangents
    y = _taps_conv(x, kernel, pad, precision)
    dy = None
    if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
        dy = _taps_conv(dx, kernel, pad, precision)
    if not isinstance(dk, jax.custom_derivatives.SymbolicZero):
        padded = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
        steps = y.shape[1]
        for t in range(kernel.shape[0]):
            term = jnp.einsum("bti,io->bto", padded[:, t:t + steps], dk[t], precision=precision)
            dy = term if dy is None else dy + term
    if dy is None:
        dy = jnp.zeros_like(y)
    return y, dy.astype(y.dtype)


class Snake(nn.Module):
    """Snake activation `x + sin(alpha*x)^2 / alpha` with a learned per-channel alpha `[channels]`."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        alpha = self.param("alpha", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return snake(x, alpha, self.dtype)


class ResidualUnit(nn.Module):
    """Snake -> dilated conv (k=7, depthwise when groups=dim) -> Snake -> 1x1 conv, plus skip."""

    dilation: int = 1
    kernel_size: int = 7
    groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array, valid: Optional[Array] = None) -> Array:
        """x `[batch, time, dim]`; `valid` int `[batch]`: steps of each row that hold signal
        (the dilated conv sees zeros beyond them, as in the row's own padding); None: all."""
        dim = x.shape[-1]
        if IMPL["residual_unit"] in ("pallas", "pallas_interpret") and not self.is_initializing():
            fused = self._fused(x, valid)
            if fused is not None:
                return fused
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        pad = (self.kernel_size - 1) * self.dilation // 2
        # Snake(0) = 0, so masking its input is masking the conv's input (and fuses with it).
        y = Snake(self.dtype, self.param_dtype, name="snake_1")(apply_mask(x, valid))
        y = WNConv1d(dim, self.kernel_size, dilation=self.dilation, padding=pad, groups=self.groups,
                     name="conv_dilated", **kw)(y)
        y = Snake(self.dtype, self.param_dtype, name="snake_2")(y)
        y = WNConv1d(dim, 1, name="conv_pointwise", **kw)(y)
        crop = (x.shape[1] - y.shape[1]) // 2
        if crop > 0:
            x = x[:, crop:-crop]
        return x.astype(self.dtype) + y

    def _fused(self, x: Array, valid: Optional[Array]) -> Optional[Array]:
        """The unit as `fused_residual`'s kernel, from this unit's (initialised) parameters;
        None where the kernel does not apply (then the XLA path runs)."""
        from codec_jax.nn import fused_residual

        interpret = IMPL["residual_unit"] == "pallas_interpret"
        if not fused_residual.supported(x.shape, self.dtype, self.kernel_size, self.groups,
                                        any_backend=interpret):
            return None
        return fused_residual.fused_residual_unit(
            x.astype(self.dtype), *fused_residual.unit_weights(self.variables["params"]),
            self.dilation, valid, interpret=interpret, **fused_residual.TUNING)


DILATIONS = (1, 3, 9)  # of a block's three residual units


def residual_units(block: nn.Module, x: Array, valid: Optional[Array], groups: int,
                   **kw) -> Array:
    """A block's residual units (`res_unit_0..2`, dilations 1, 3, 9) on x `[batch, time,
    dim]`, called from `block`'s compact method (the units are its submodules).

    Under residual_unit="pallas_stack" (and where `fused_residual` supports the shape) the
    three run as `fused_residual_stack` from their parameters, without calling the units."""
    if (IMPL["residual_unit"] in ("pallas_stack", "pallas_stack_interpret")
            and not block.is_initializing()):
        from codec_jax.nn import fused_residual

        interpret = IMPL["residual_unit"] == "pallas_stack_interpret"
        if fused_residual.supported(x.shape, block.dtype, 7, groups, any_backend=interpret):
            params = block.variables["params"]
            units = tuple(fused_residual.unit_weights(params[f"res_unit_{i}"])
                          for i in range(len(DILATIONS)))
            return fused_residual.fused_residual_stack(
                x.astype(block.dtype), units, DILATIONS, valid, interpret=interpret,
                **fused_residual.STACK_TUNING)
    for i, dilation in enumerate(DILATIONS):
        x = ResidualUnit(dilation, groups=groups, name=f"res_unit_{i}", **kw)(x, valid)
    return x


class EncoderBlock(nn.Module):
    """Three residual units (dilations 1, 3, 9) on `in` channels, then a strided conv to `features`."""

    features: int
    stride: int
    groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array, valid: Optional[Array] = None) -> Array:
        """x `[batch, time, in]` -> `[batch, time // stride, features]`; `valid` `[batch]`
        counts each row's valid input steps (None: all), see `ResidualUnit`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        x = residual_units(self, x, valid, self.groups, **kw)
        x = Snake(self.dtype, self.param_dtype, name="snake")(apply_mask(x, valid))
        return WNConv1d(self.features, 2 * self.stride, stride=self.stride,
                        padding=math.ceil(self.stride / 2), name="conv_down", **kw)(x)


class NoiseBlock(nn.Module):
    """Adds `noise * W x`, noise `[batch, time, 1]` ~ N(0, 1) shared across channels (SNAC).

    Noise is drawn from the `noise` rng stream; without that stream the block is the identity,
    which makes decoding deterministic unless the caller asks for noise.

    With `frame_offsets` (int `[batch]`, the absolute latent frame at which each row starts)
    the noise is a function of the rng and the absolute position only: step `t` of row `b`
    lies in latent frame `f = frame_offsets[b] + t // steps_per_frame`, and each frame's
    `steps_per_frame` values come from `fold_in(key, f)`. A clip then gets the same noise
    whether it is decoded alone, inside a batch, or as chunks of a longer file. Without
    offsets (training) every row draws independent noise, as `torch.randn((B, 1, T))` does.
    """

    steps_per_frame: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array, frame_offsets: Optional[Array] = None) -> Array:
        linear = WNConv1d(x.shape[-1], 1, use_bias=False, dtype=self.dtype,
                          param_dtype=self.param_dtype, precision=self.precision, name="linear")
        if self.is_initializing():
            linear(x)  # create the parameters even though init has no noise rng
        if not self.has_rng("noise"):
            return x
        key = self.make_rng("noise")
        if frame_offsets is None:
            noise = jax.random.normal(key, x.shape[:2] + (1,), jnp.float32)
        else:
            noise = positional_noise(key, frame_offsets, x.shape[1], self.steps_per_frame)[..., None]
        return x + noise.astype(self.dtype) * linear(x)


def positional_noise(key: Array, frame_offsets: Array, time: int, steps_per_frame: int) -> Array:
    """float32 `[batch, time]` of N(0, 1) noise that depends only on `key` and the absolute
    position: row `b`, step `t` is value `t % steps_per_frame` of
    `normal(fold_in(key, frame_offsets[b] + t // steps_per_frame), [steps_per_frame])`.
    `time` must be a multiple of `steps_per_frame`."""
    if time % steps_per_frame:
        raise ValueError(f"time={time} is not a multiple of steps_per_frame={steps_per_frame}")
    frames = jnp.asarray(frame_offsets, jnp.int32)[:, None] + jnp.arange(time // steps_per_frame)

    def frame_noise(frame):
        return jax.random.normal(jax.random.fold_in(key, frame), (steps_per_frame,), jnp.float32)

    noise = jax.vmap(jax.vmap(frame_noise))(frames)  # [batch, frames, steps_per_frame]
    return noise.reshape(noise.shape[0], time)


class DecoderBlock(nn.Module):
    """Snake -> transposed conv (upsample by `stride`) -> [noise] -> three residual units."""

    features: int
    stride: int
    noise: bool = False
    groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    # Output steps per latent frame (the product of this and the earlier blocks' strides);
    # places the noise on the absolute latent-frame grid (see `NoiseBlock`).
    steps_per_frame: int = 1

    @nn.compact
    def __call__(self, x: Array, valid: Optional[Array] = None,
                 frame_offsets: Optional[Array] = None) -> Array:
        """x `[batch, time, in]` -> `[batch, time * stride, features]`. `valid` `[batch]`:
        valid input steps per row (None: all); `frame_offsets`: see `NoiseBlock`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        x = Snake(self.dtype, self.param_dtype, name="snake")(apply_mask(x, valid))
        x = WNConvTranspose1d(self.features, 2 * self.stride, stride=self.stride,
                              padding=math.ceil(self.stride / 2), output_padding=self.stride % 2,
                              name="conv_up", **kw)(x)
        valid = None if valid is None else valid * self.stride
        if self.noise:
            x = NoiseBlock(self.steps_per_frame, name="noise", **kw)(x, frame_offsets)
        return residual_units(self, x, valid, self.groups, **kw)


def rotary_frequencies(seq_len: int, head_dim: int) -> Array:
    """SNAC's rotary table `[seq_len, head_dim]`: positions times inverse frequencies, twice."""
    inv_freq = 1.0 / (10000 ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.concatenate([freqs, freqs], axis=-1)


def _rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


class LocalMHA(nn.Module):
    """Pre-norm multi-head self-attention within non-overlapping windows, plus residual.

    Input `[batch, time, dim]` with `time` a multiple of `window_size`; heads of 64 channels;
    rotary position embeddings restart at every window (SNAC's `LocalMHA`).
    """

    window_size: int
    head_dim: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        batch, time, dim = x.shape
        if time % self.window_size:
            raise ValueError(
                f"LocalMHA: time={time} is not a multiple of the window {self.window_size}; "
                "pad the audio as SNACConfig.pad_multiple says"
            )
        heads = dim // self.head_dim
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                     precision=self.precision)
        h = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=self.param_dtype, name="norm")(
            x.astype(jnp.float32)
        )
        qkv = nn.Dense(3 * dim, name="to_qkv", **dense)(h.astype(self.dtype))
        windows = time // self.window_size
        # [batch, time, 3*dim] -> 3 x [batch*windows, window, heads, head_dim]
        qkv = qkv.reshape(batch * windows, self.window_size, 3, heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        freqs = rotary_frequencies(self.window_size, self.head_dim)[None, :, None, :]
        cos, sin = jnp.cos(freqs).astype(self.dtype), jnp.sin(freqs).astype(self.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = jax.nn.dot_product_attention(q, k, v)
        out = out.reshape(batch, time, dim)
        out = nn.Dense(dim, name="to_out", **dense)(out)
        return out + x.astype(self.dtype)
