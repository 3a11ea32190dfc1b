"""Public entry points: `load_pretrained`, the `Codec` object and pure jitted functions.

The functional forms take the variables pytree first and are jitted with the config (a
frozen dataclass) static, so they compile once per input shape and dtype and can be used
inside other jitted code.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from codec_jax import checkpoint
from codec_jax.config import PRESETS, SNACConfig, get_preset
from codec_jax.errors import UsageError
from codec_jax.nn.snac import SNAC, check_audio
from codec_jax.nn.quantizer import QuantizerConfig

Array = jax.Array
Variables = dict[str, Any]


FACTORIZED = QuantizerConfig()


def _model(config: SNACConfig, dtype, quantizer: QuantizerConfig = FACTORIZED) -> SNAC:
    return SNAC(config, dtype=jnp.dtype(dtype), quantizer=quantizer)


# Rows coded at once when `rows_per_call="auto"`: as many as hold about this many samples
# (16 rows of 10 s at 32 kHz is 5.1 M). Throughput is flat from there up (BENCHMARKS §1:
# 32 kHz bf16 decode 2744x at batch 16, 2699x at 64) while peak memory grows with the rows.
AUTO_SAMPLES_PER_CALL = 1 << 22


def rows_per_call_for(rows_per_call, batch: int, samples: int) -> Optional[int]:
    """How many rows one pass of the network takes: None (all) or a count below `batch`.

    `rows_per_call`: None (all rows at once), an int, or "auto": the fewest passes of at
    most `AUTO_SAMPLES_PER_CALL` samples each (at least one row), the rows spread evenly."""
    if rows_per_call is None:
        return None
    if rows_per_call == "auto":
        # As few passes as the budget allows, rows spread evenly over them (pad rows < passes).
        passes = -(-batch * max(int(samples), 1) // AUTO_SAMPLES_PER_CALL)
        rows_per_call = -(-batch // passes)
    if not isinstance(rows_per_call, int) or isinstance(rows_per_call, bool) or rows_per_call < 1:
        raise UsageError(f"rows_per_call must be a positive int, 'auto' or None, got {rows_per_call!r}")
    return None if rows_per_call >= batch else rows_per_call


def _map_rows(fn, args: tuple, rows: Optional[int]):
    """`fn(*args)` for arrays whose axis 0 is the batch, computed `rows` rows at a time inside
    one program (`lax.map`): peak memory is that of `rows` rows, the result the same.

    The batch is padded with zero rows to a multiple of `rows` (code 0, length 0) and the
    padding dropped from the result. None entries of `args` pass through."""
    if rows is None:
        return fn(*args)
    batch = jax.tree_util.tree_leaves(args)[0].shape[0]
    calls = -(-batch // rows)

    def split(a):
        a = jnp.pad(a, [(0, calls * rows - batch)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((calls, rows) + a.shape[1:])

    out = jax.lax.map(lambda chunk: fn(*chunk), jax.tree_util.tree_map(split, args))
    return jax.tree_util.tree_map(lambda a: a.reshape((calls * rows,) + a.shape[2:])[:batch], out)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "n_levels", "quantizer",
                                             "rows_per_call"))
def encode(variables: Variables, audio: Array, *, config: SNACConfig, dtype: str = "float32",
           n_levels: Optional[int] = None, quantizer: QuantizerConfig = FACTORIZED,
           lengths: Optional[Array] = None, rows_per_call="auto") -> list[Array]:
    """audio float `[batch, samples]` -> list of int32 `[batch, frames_level]`, coarse first.

    `lengths` int `[batch]` (traced: one compilation serves every mix of lengths): valid
    samples per row; row `b`'s first `config.num_frames(lengths[b])[level]` codes equal
    coding that row alone, later ones are 0. `quantizer` must describe the codebooks in
    `variables` (EMA-trained codecs keep theirs in the `codebook` collection).
    `rows_per_call` (see `rows_per_call_for`): rows the network codes at once; fewer rows
    bound peak memory and leave the codes unchanged (rows never interact)."""
    model = _model(config, dtype, quantizer)

    def run(audio, lengths):
        return model.apply(variables, audio, n_levels=n_levels, lengths=lengths, method=SNAC.encode)

    rows = rows_per_call_for(rows_per_call, audio.shape[0], audio.shape[1])
    return _map_rows(run, (audio, lengths), rows)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "length", "quantizer",
                                             "rows_per_call"))
def decode(variables: Variables, codes: Sequence[Array], *, config: SNACConfig,
           dtype: str = "float32", length: Optional[int] = None,
           rng: Optional[jax.Array] = None, quantizer: QuantizerConfig = FACTORIZED,
           lengths: Optional[Array] = None, frame_offsets: Optional[Array] = None,
           rows_per_call="auto") -> Array:
    """codes (all levels or a coarse-first prefix) -> float32 audio `[batch, samples]`.

    `length` trims the right padding added at encode time. `lengths` int `[batch]`: valid
    samples per row; row `b` equals decoding its own codes alone, zero after `lengths[b]`.
    With `rng=None` the noise blocks add nothing; with a key they add Gaussian noise as
    SNAC does, drawn as a function of the key and the absolute latent frame, so a row's
    noise does not depend on the batch; `frame_offsets` int `[batch]` (default 0) is the
    absolute latent frame of each row's first frame (chunked decoding of a long file).
    `rows_per_call`: rows decoded at once, as in `encode` (the audio does not change).
    """
    rngs = None
    if rng is not None:
        rngs = {"noise": rng}
        if frame_offsets is None:
            frame_offsets = jnp.zeros((codes[0].shape[0],), jnp.int32)
    model = _model(config, dtype, quantizer)

    def run(codes, lengths, frame_offsets):
        return model.apply(variables, codes, length=length, lengths=lengths,
                           frame_offsets=frame_offsets, rngs=rngs,
                           method=SNAC.decode).astype(jnp.float32)

    samples = codes[0].shape[1] * config.vq_strides[0] * config.hop_length
    rows = rows_per_call_for(rows_per_call, codes[0].shape[0], samples)
    return _map_rows(run, (list(codes), lengths, frame_offsets), rows)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def encode_latents(variables: Variables, audio: Array, *, config: SNACConfig,
                   dtype: str = "float32") -> Array:
    """audio `[batch, samples]` -> continuous encoder output `[batch, frames, latent_channels]`."""
    return _model(config, dtype).apply(variables, audio, method=SNAC.encode_latents)


def init_variables(config: SNACConfig, rng: jax.Array | int = 0,
                   quantizer: QuantizerConfig = FACTORIZED) -> Variables:
    """Freshly initialised variables for `config` (PyTorch's default init distributions)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    # `init` runs a forward pass; on an accelerator that pass would be compiled and
    # autotuned (tens of seconds for the full presets), so initialise on the host CPU and
    # hand the arrays to the default device.
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        dummy = jnp.zeros((1, config.pad_multiple) + ((config.audio_channels,) if config.audio_channels > 1 else ()),
                          jnp.float32)
        variables = jax.jit(_model(config, "float32", quantizer).init)(jax.device_put(rng, cpu), dummy)
    return jax.device_put(variables, jax.devices()[0])


# A second axis this short next to a long first one is a channel axis, not a batch of clips.
MAX_CHANNELS_LOOKALIKE = 8


def _as_audio(audio, channels: int = 1) -> jax.Array:
    """Validate `[batch, samples]` float audio (`[batch, samples, channels]` for a
    multi-channel model); one clear error for any other layout."""
    if not hasattr(audio, "shape") or not hasattr(audio, "dtype"):
        audio = np.asarray(audio)
    shape = tuple(audio.shape)
    if channels > 1:
        if len(shape) == 2 and shape[1] == channels:
            raise UsageError(f"audio of shape {shape} is one [samples, {channels}] clip; this "
                             f"{channels}-channel model takes [batch, samples, {channels}]: use audio[None]")
        try:
            check_audio(audio, channels)
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        if len(shape) == 1:
            raise UsageError(
                f"audio must be [batch, samples] (mono clips as rows); got a 1-D array of {shape[0]} "
                "samples: use audio[None] for one clip, or Codec.encode_many for a list of clips"
            )
        if len(shape) != 2:
            raise UsageError(
                f"audio must be [batch, samples] (mono clips as rows); got shape {shape}: "
                "mix channels down (or code them as separate rows) first"
            )
        if shape[1] <= MAX_CHANNELS_LOOKALIKE < shape[0]:
            raise UsageError(
                f"audio of shape {shape} looks like [samples, channels] (soundfile's layout); "
                "Codec.encode expects [batch, samples]: pass audio.T for channels as rows, "
                "or audio.mean(axis=1)[None] to mix down to one clip"
            )
        try:
            check_audio(audio)
        except ValueError as e:
            raise UsageError(str(e)) from None
    audio = jnp.asarray(audio)
    # Checked here, outside the jitted functions: NaN or inf would silently map to code 0.
    if not bool(jnp.all(jnp.isfinite(audio))):
        raise UsageError("audio contains NaN or infinite samples")
    return audio.astype(jnp.float32)


def _as_lengths(lengths, batch: int, samples: int) -> np.ndarray:
    """int32 `[batch]` of valid samples per row, each in [1, samples]."""
    values = np.asarray(lengths)
    if values.shape != (batch,):
        raise UsageError(f"lengths must be one int per row, shape ({batch},); got shape {values.shape}")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        if not np.all(values == np.round(values)):
            raise UsageError(f"lengths must be whole numbers of samples, got {values}")
    values = values.astype(np.int64)
    bad = (values < 1) | (values > samples)
    if bad.any():
        row = int(np.argmax(bad))
        raise UsageError(f"lengths[{row}]={values[row]} is outside [1, {samples}] "
                         f"(the rows have {samples} samples)")
    return values.astype(np.int32)


class Codec:
    """A SNAC codec bound to its variables: `encode(audio)` / `decode(codes, length, rng)`.

    `dtype` selects the compute dtype ("float32" or "bfloat16"); parameters stay float32.
    """

    def __init__(self, config: SNACConfig, variables: Variables, dtype: str = "float32",
                 quantizer: QuantizerConfig = FACTORIZED):
        self.config = config
        self.quantizer = quantizer
        self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
        self.dtype = dtype

    @property
    def params(self):
        return self.variables["params"]

    @property
    def sample_rate(self) -> int:
        return self.config.sampling_rate

    def resampled_length(self, length: int, sample_rate: int) -> int:
        """Samples at the model's rate that `length` samples at `sample_rate` become when
        `encode(..., sample_rate=...)` resamples them (soxr's output length)."""
        rate = self.sample_rate
        return (2 * int(length) * rate + int(sample_rate)) // (2 * int(sample_rate))

    def encode(self, audio, *, lengths=None, sample_rate: Optional[int] = None,
               n_levels: Optional[int] = None) -> list[Array]:
        """Float audio `[batch, samples]` (numpy or jax) -> list per level (coarse first) of
        int32 `[batch, frames_level]` for the padded batch.

        `lengths` int `[batch]`: valid samples of each row (default: all). Row `b`'s valid
        frames at level `l` are `config.num_frames(lengths[b])[l]` and equal coding
        `audio[b, :lengths[b]]` alone (up to float near-ties); the frames after them are 0.
        Without `lengths` every row is coded at the full width, as SNAC codes a batch.

        `sample_rate`: the rate of `audio`; if it differs from the model's each row's valid
        part is resampled with soxr (high quality) first, and the lengths that count are
        `resampled_length(lengths[b], sample_rate)`. A `[samples, channels]`-looking array
        (second axis <= 8, first longer), 1-D or 3-D input raise a `UsageError`.
        """
        audio = _as_audio(audio, self.config.audio_channels)
        batch, samples = audio.shape[:2]
        valid = None if lengths is None else _as_lengths(lengths, batch, samples)
        if sample_rate is not None and int(sample_rate) != self.sample_rate:
            audio, valid = self._resample(audio, valid, int(sample_rate))
        return encode(self.variables, audio, config=self.config, dtype=self.dtype,
                      n_levels=n_levels, quantizer=self.quantizer,
                      lengths=None if valid is None else jnp.asarray(valid))

    def _resample(self, audio: Array, valid: Optional[np.ndarray], sample_rate: int):
        """Resample each row's valid part to the model rate -> (audio, lengths or None)."""
        import soxr

        if sample_rate <= 0:
            raise UsageError(f"sample_rate must be positive, got {sample_rate}")
        host = np.asarray(audio)
        rows = host if valid is None else [row[:n] for row, n in zip(host, valid)]
        out = [soxr.resample(row, sample_rate, self.sample_rate) for row in rows]
        lengths = np.array([len(r) for r in out], np.int32)
        padded = np.zeros((len(out), int(lengths.max())) + host.shape[2:], np.float32)
        for i, r in enumerate(out):
            padded[i, : len(r)] = r
        return jnp.asarray(padded), (None if valid is None else lengths)

    def encode_many(self, clips: Sequence[Any], *, sample_rate: Optional[int] = None,
                    n_levels: Optional[int] = None) -> list[list[np.ndarray]]:
        """A list of 1-D float clips (any lengths) -> for each clip, a list per level of int32
        `[frames_level]` (numpy), equal to coding each clip alone. The clips are zero-padded
        into one batch (one compilation per padded width) and coded with `lengths=`."""
        if isinstance(clips, (np.ndarray, jax.Array)) and np.ndim(clips) != 1:
            clips = list(clips)
        if len(clips) == 0:
            raise UsageError("encode_many needs at least one clip")
        rows = []
        for i, clip in enumerate(clips):
            clip = np.asarray(clip)
            if clip.ndim != 1 or clip.size == 0:
                raise UsageError(f"clips[{i}] must be a non-empty 1-D array of samples, "
                                 f"got shape {clip.shape}")
            if not np.issubdtype(clip.dtype, np.floating):
                raise UsageError(f"clips[{i}] must be floating point in [-1, 1], got dtype {clip.dtype}")
            if sample_rate is not None and int(sample_rate) != self.sample_rate:
                import soxr

                clip = soxr.resample(clip.astype(np.float32), int(sample_rate), self.sample_rate)
            rows.append(clip.astype(np.float32))
        lengths = np.array([len(r) for r in rows], np.int32)
        batch = np.zeros((len(rows), self.config.padded_length(int(lengths.max()))), np.float32)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = r
        codes = [np.asarray(c) for c in self.encode(batch, lengths=lengths, n_levels=n_levels)]
        return [[c[i, :f] for c, f in zip(codes, self.config.num_frames(int(n)))]
                for i, n in enumerate(lengths)]

    def decode(self, codes: Sequence[Any], *, lengths=None, length: Optional[int] = None,
               rng: Optional[jax.Array] = None, frame_offsets=None) -> Array:
        """codes (list per level, coarse first, of int `[batch, frames_level]`) -> float32
        audio `[batch, samples]`.

        `lengths` int `[batch]`: valid samples per row (as given to `encode`); row `b` then
        equals decoding its own `config.num_frames(lengths[b])` codes alone with
        `length=lengths[b]`, and is zero after `lengths[b]`; the output has `max(lengths)`
        samples unless `length` says otherwise. `length` trims SNAC's right padding.
        `rng`: a key to sample the decoder's noise (default: no noise); the noise is a
        function of the key and the absolute position, the same for every row, so batched,
        alone and chunked decodes agree. `frame_offsets` int `[batch]`: absolute latent frame
        of each row's first frame (for chunks of a long file; default 0).
        """
        codes = [jnp.asarray(c, jnp.int32) for c in codes]
        self._check_codes(codes)
        valid = None
        if lengths is not None:
            frames = codes[0].shape[1] * self.config.vq_strides[0]
            valid = _as_lengths(lengths, codes[0].shape[0], frames * self.config.hop_length)
            need = max(self.config.num_frames(int(n))[0] for n in valid)
            if need > codes[0].shape[1]:
                raise UsageError(f"lengths up to {int(valid.max())} samples need {need} level-0 "
                                 f"frames; the codes have {codes[0].shape[1]}")
            if length is None:
                length = int(valid.max())
            valid = jnp.asarray(valid)
        if frame_offsets is not None:
            frame_offsets = jnp.broadcast_to(jnp.asarray(frame_offsets, jnp.int32), codes[0].shape[:1])
        return decode(self.variables, codes, config=self.config, dtype=self.dtype,
                      length=length, rng=rng, quantizer=self.quantizer, lengths=valid,
                      frame_offsets=frame_offsets)

    def _check_codes(self, codes: Sequence[Array]) -> None:
        c = self.config
        if not 1 <= len(codes) <= c.n_levels:
            raise ValueError(f"expected 1..{c.n_levels} code levels (coarse first), got {len(codes)}")
        finest = None
        for level, (stride, x) in enumerate(zip(c.vq_strides, codes)):
            if x.ndim != 2:
                raise ValueError(f"codes[{level}] must be [batch, frames], got shape {x.shape}")
            if x.shape[1] == 0:
                raise ValueError(f"codes[{level}] has no frames: nothing to decode")
            frames = x.shape[1] * stride
            if finest is None:
                finest = frames
            elif frames != finest:
                raise ValueError(
                    f"codes[{level}] has {x.shape[1]} frames; with stride {stride} it should have "
                    f"{finest // stride} to match level 0"
                )
        sizes = self.quantizer.level_codebook_sizes(c.n_levels, c.codebook_size)
        # One device-to-host transfer for every level's range, not two per level.
        bounds = jax.device_get([(jnp.min(x), jnp.max(x)) for x in codes])
        for level, (size, (lo, hi)) in enumerate(zip(sizes, bounds)):
            if lo < 0 or hi >= size:
                raise ValueError(f"codes[{level}]: code values must be in [0, {size}), got [{lo}, {hi}]")

    def save(self, path: str | os.PathLike) -> None:
        """Write `config.json` + orbax variables; `load_pretrained(path)` reads them back."""
        checkpoint.save_converted(path, self.config, self.variables, self.quantizer)


def load_pretrained(path: str | os.PathLike, dtype: str = "float32") -> Codec:
    """Load a codec from a directory or a preset name.

    - SNAC hub-style directory (`config.json` + `pytorch_model.bin` or `model.safetensors`):
      imported without torch and without executing pickled code;
    - a directory written by `Codec.save` (orbax);
    - a preset name (`snac_24khz`, `snac_32khz`, `snac_44khz`, `tiny`) gives randomly
      initialised weights (no download ever happens).

    Directories may be local or in a bucket (`gs://...`, read through etils.epath).
    """
    from codec_jax.paths import as_path

    p = as_path(path)
    if p.is_dir():
        if (p / checkpoint.PARAMS_SUBDIR).exists():
            config, variables, quantizer = checkpoint.load_converted(p)
            return Codec(config, variables, dtype=dtype, quantizer=quantizer)
        config, params = checkpoint.load_snac_directory(p)
        return Codec(config, {"params": params}, dtype=dtype)
    from codec_jax.errors import PathNotFoundError

    if isinstance(path, str) and not os.sep in path:
        try:
            config = get_preset(path)
        except ValueError:
            raise PathNotFoundError(
                f"{path!r} is neither a model directory nor a preset name (presets: "
                f"{', '.join(sorted(PRESETS))})") from None
        return Codec(config, init_variables(config), dtype=dtype)
    raise PathNotFoundError(f"{path}: no such model directory")
