"""Import SNAC checkpoints without torch, and save/restore converted parameters with orbax.

A SNAC directory holds `config.json` and `pytorch_model.bin` (a torch zip archive) or
`model.safetensors`. The torch archive is read with a restricted unpickler that can only
rebuild tensors and ordered dicts: any other global in the pickle (e.g. `os.system`) is
refused before it is called, so importing never executes code from the file.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from codec_jax.config import SNACConfig
from codec_jax.errors import PathNotFoundError, WorkError


class UnsafeCheckpointError(WorkError, pickle.UnpicklingError):
    """The pickle asks for something other than tensors: it is not loaded."""


class CorruptCheckpointError(WorkError, ValueError):
    """A checkpoint file cannot be read: truncated, garbled, or not the expected format."""


class CheckpointMismatchError(WorkError, ValueError):
    """State dict keys or shapes do not match the architecture in `config.json`."""


# ---------------------------------------------------------------------------------------
# Reading torch's zip serialisation without torch.
# ---------------------------------------------------------------------------------------

def _bfloat16():
    import ml_dtypes

    return ml_dtypes.bfloat16


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        dtype = _STORAGE_DTYPES[name]
        self.dtype = np.dtype(_bfloat16() if dtype == "bfloat16" else dtype)


class _Storage:
    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise pickle.UnpicklingError(f"tensor {what} {value!r} is not a tuple of integers >= 0")
    return tuple(value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    # Every number comes from the (untrusted) pickle and goes into `as_strided`, which
    # does no bounds checking: check them all so that the view stays inside the storage
    # and no view holds more elements than its storage (no memory blow-up either).
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor storage is a {type(storage).__name__}")
    flat = storage.array
    itemsize = flat.dtype.itemsize
    (storage_offset,) = _int_tuple((storage_offset,), "offset")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
    if not size:
        if storage_offset >= flat.size:
            raise pickle.UnpicklingError("scalar tensor lies past the end of its storage")
        return np.array(flat[storage_offset])
    if int(np.prod(size, dtype=object)) > flat.size:
        raise pickle.UnpicklingError(f"tensor of shape {size} is larger than its storage")
    needed = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if min(size) > 0 and needed > flat.size:
        raise pickle.UnpicklingError("tensor view runs past the end of its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:], shape=size, strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)  # copy: detach from the shared storage buffer


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Only the handful of globals a plain tensor state dict needs; nothing is imported."""

    _SAFE = {
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    }

    def __init__(self, file, read_record, source: str):
        super().__init__(file)
        self._read_record = read_record
        self._source = source
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._SAFE:
            return self._SAFE[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"{self._source}: refusing to load: the pickle asks for {module}.{name}, which is not "
            "part of a plain tensor state dict (a checkpoint from an untrusted source can run "
            "code this way). Nothing from it was executed."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self._source}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"{self._source}: unexpected storage type {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            raw = self._read_record(key)
            array = np.frombuffer(raw, dtype=storage_type.dtype)
            if array.size < numel:
                raise pickle.UnpicklingError(f"{self._source}: storage {key} is truncated")
            self._storages[key] = _Storage(array)
        return self._storages[key]


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `torch.save`d state dict (zip format) into numpy arrays, without torch.

    Raises `UnsafeCheckpointError` if the pickle references anything but tensors, and
    `CorruptCheckpointError` (a `ValueError`) for anything else wrong with the file:
    truncated, garbled, not a zip archive, not a state dict of tensors.
    """
    path = Path(path)
    try:
        return _read_torch_archive(path)
    except UnsafeCheckpointError:
        raise
    except CorruptCheckpointError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError,
            ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
            UnicodeDecodeError, NotImplementedError, RuntimeError, OSError) as e:
        # What a damaged archive raises depends on where the damage is (zip directory,
        # deflate stream, CRC, pickle opcodes, tensor metadata); all of it means "corrupt".
        if isinstance(e, FileNotFoundError):
            raise PathNotFoundError(f"{path}: no such file") from None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CorruptCheckpointError(
            f"{path}: corrupt torch checkpoint ({type(e).__name__}: {first})") from e


def _read_torch_archive(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise CorruptCheckpointError(
            f"{path}: not a torch zip archive (torch >= 1.6 format). Legacy or corrupt files are "
            "not read; re-save with `torch.save(model.state_dict(), path)`."
        )
    with zipfile.ZipFile(path) as archive:
        # torch stores its records uncompressed; a member that inflates far beyond the
        # file's own size is a zip bomb, not a checkpoint.
        limit = 64 * os.path.getsize(path) + 2**20
        if sum(info.file_size for info in archive.infolist()) > limit:
            raise CorruptCheckpointError(
                f"{path}: the archive's members claim more than 64x the file's size")
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise CorruptCheckpointError(
                f"{path}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode().strip()

        def read_record(key: str) -> bytes:
            try:
                return archive.read(f"{prefix}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"{path}: storage record {key} missing") from None

        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), read_record, str(path))
        state = unpickler.load()
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, np.ndarray):
            raise CorruptCheckpointError(
                f"{path}: entry {key!r} is not a tensor ({type(value).__name__})")
        if byteorder == "big" and value.dtype.itemsize > 1:
            value = value.byteswap().view(value.dtype.newbyteorder())
        out[str(key)] = value
    return out


def load_safetensors_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read `model.safetensors` into numpy arrays; `CorruptCheckpointError` if the file
    is truncated or its header is not valid."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except FileNotFoundError:
        raise PathNotFoundError(f"{path}: no such file") from None
    except (SafetensorError, ValueError, TypeError, OSError, OverflowError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CorruptCheckpointError(
            f"{path}: corrupt safetensors file ({type(e).__name__}: {first})") from e


# ---------------------------------------------------------------------------------------
# Mapping SNAC's PyTorch names onto our parameter tree.
# ---------------------------------------------------------------------------------------

def _layout(config: SNACConfig) -> Iterator[tuple[tuple[str, ...], str, str]]:
    """Yield `(flax_path, torch_prefix, kind)` for every parameterised layer of SNAC."""
    c = config

    def res_units(fp, tp, first):
        for r in range(3):
            f, t = fp + (f"res_unit_{r}",), f"{tp}.block.{first + r}"
            yield f + ("snake_1",), f"{t}.block.0", "snake"
            yield f + ("conv_dilated",), f"{t}.block.1", "conv"
            yield f + ("snake_2",), f"{t}.block.2", "snake"
            yield f + ("conv_pointwise",), f"{t}.block.3", "conv"

    def attention(fp, tp):
        yield fp + ("norm",), f"{tp}.norm", "layernorm"
        yield fp + ("to_qkv",), f"{tp}.to_qkv", "linear"
        yield fp + ("to_out",), f"{tp}.to_out", "linear"
        yield fp, f"{tp}.rel_pos", "rotary"

    enc = ("encoder",)
    yield enc + ("conv_in",), "encoder.block.0", "conv"
    for i in range(len(c.encoder_rates)):
        fp, tp = enc + (f"block_{i}",), f"encoder.block.{1 + i}"
        yield from res_units(fp, tp, 0)
        yield fp + ("snake",), f"{tp}.block.3", "snake"
        yield fp + ("conv_down",), f"{tp}.block.4", "conv"
    j = 1 + len(c.encoder_rates)
    if c.attn_window_size is not None:
        yield from attention(enc + ("attention",), f"encoder.block.{j}")
        j += 1
    yield enc + ("conv_out",), f"encoder.block.{j}", "conv"

    for i in range(len(c.vq_strides)):
        fp, tp = ("quantizer", f"level_{i}"), f"quantizer.quantizers.{i}"
        yield fp + ("in_proj",), f"{tp}.in_proj", "conv"
        yield fp + ("out_proj",), f"{tp}.out_proj", "conv"
        yield fp, f"{tp}.codebook", "embedding"

    dec = ("decoder",)
    if c.depthwise:
        yield dec + ("conv_in_depthwise",), "decoder.model.0", "conv"
        yield dec + ("conv_in_pointwise",), "decoder.model.1", "conv"
        j = 2
    else:
        yield dec + ("conv_in",), "decoder.model.0", "conv"
        j = 1
    if c.attn_window_size is not None:
        yield from attention(dec + ("attention",), f"decoder.model.{j}")
        j += 1
    for i in range(len(c.decoder_rates)):
        fp, tp = dec + (f"block_{i}",), f"decoder.model.{j + i}"
        yield fp + ("snake",), f"{tp}.block.0", "snake"
        yield fp + ("conv_up",), f"{tp}.block.1", "conv_transpose"
        first = 2
        if c.noise:
            yield fp + ("noise", "linear"), f"{tp}.block.2.linear", "conv_nobias"
            first = 3
        yield from res_units(fp, tp, first)
    j += len(c.decoder_rates)
    yield dec + ("snake_out",), f"decoder.model.{j}", "snake"
    yield dec + ("conv_out",), f"decoder.model.{j + 1}", "conv"


_WEIGHT_NORM_STYLES = (
    ("weight_g", "weight_v"),
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
)


def state_dict_to_params(state_dict: dict[str, np.ndarray], config: SNACConfig) -> dict[str, Any]:
    """Convert SNAC's PyTorch state dict (numpy arrays) to our `params` tree.

    Accepts both weight-norm key styles. Missing, unexpected and mis-shaped keys are
    collected and reported together in one `CheckpointMismatchError`.
    """
    import jax
    import jax.numpy as jnp

    from codec_jax.nn.snac import SNAC
    from codec_jax.nn.layers import rotary_frequencies

    # Expected shapes come from the model itself, so the check can never drift from the code.
    dummy = jnp.zeros((1, config.pad_multiple), jnp.float32)
    expected = jax.eval_shape(lambda: SNAC(config).init(jax.random.key(0), dummy))["params"]

    def lookup(tree, path):
        for p in path:
            tree = tree[p]
        return tree

    remaining = dict(state_dict)
    missing, misshaped = [], []
    params: dict[str, Any] = {}

    def take(key):
        if key not in remaining:
            missing.append(key)
            return None
        return np.asarray(remaining.pop(key))

    def put(path, name, value, transform):
        if value is None:
            return
        target = lookup(expected, path)[name]
        try:
            value = transform(value)
        except ValueError:
            value = None
        if value is None or value.shape != target.shape:
            misshaped.append(f"{'/'.join(path + (name,))}: expected {tuple(target.shape)}")
            return
        node = params
        for p in path:
            node = node.setdefault(p, {})
        node[name] = value.astype(np.float32)

    def weight_norm_keys(prefix):
        for g_name, v_name in _WEIGHT_NORM_STYLES:
            if f"{prefix}.{g_name}" in remaining:
                return f"{prefix}.{g_name}", f"{prefix}.{v_name}"
        return f"{prefix}.{_WEIGHT_NORM_STYLES[1][0]}", f"{prefix}.{_WEIGHT_NORM_STYLES[1][1]}"

    for path, prefix, kind in _layout(config):
        if kind in ("conv", "conv_nobias", "conv_transpose"):
            g_key, v_key = weight_norm_keys(prefix)
            v, g = take(v_key), take(g_key)
            # torch Conv1d weight [out, in/g, k] -> [k, in/g, out];
            # ConvTranspose1d weight [in, out/g, k] -> [k, in, out/g]; magnitude [C, 1, 1] -> [C].
            perm = (2, 0, 1) if kind == "conv_transpose" else (2, 1, 0)
            put(path, "direction", v, lambda a: a.transpose(perm) if a.ndim == 3 else None)
            put(path, "magnitude", g, lambda a: a.reshape(-1))
            if kind != "conv_nobias":
                put(path, "bias", take(f"{prefix}.bias"), lambda a: a)
        elif kind == "snake":
            put(path, "alpha", take(f"{prefix}.alpha"), lambda a: a.reshape(-1))
        elif kind == "layernorm":
            put(path, "scale", take(f"{prefix}.weight"), lambda a: a)
            put(path, "bias", take(f"{prefix}.bias"), lambda a: a)
        elif kind == "linear":
            put(path, "kernel", take(f"{prefix}.weight"), lambda a: a.T)
        elif kind == "embedding":
            put(path, "codebook", take(f"{prefix}.weight"), lambda a: a)
        elif kind == "rotary":
            # A buffer, not a parameter: we recompute it, but a checkpoint that disagrees
            # with SNAC's formula was made by a different model.
            inv_freq = remaining.pop(f"{prefix}.inv_freq", None)
            if inv_freq is not None:
                ref = np.asarray(rotary_frequencies(2, 64))[1, :32]
                if inv_freq.shape != ref.shape or not np.allclose(inv_freq, ref, rtol=1e-5):
                    misshaped.append(f"{prefix}.inv_freq: not SNAC's rotary frequencies")

    unexpected = sorted(remaining)
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if misshaped:
            parts.append(f"wrong shapes ({len(misshaped)}): {misshaped}")
        raise CheckpointMismatchError(
            "checkpoint does not match the architecture in its config.json:\n  " + "\n  ".join(parts)
        )
    return params


# ---------------------------------------------------------------------------------------
# Directories: SNAC hub-style (import) and our own orbax format (fast reload).
# ---------------------------------------------------------------------------------------

PARAMS_SUBDIR = "params_orbax"


def load_snac_directory(path: str | os.PathLike) -> tuple[SNACConfig, dict[str, Any]]:
    """Read `config.json` + (`model.safetensors` | `pytorch_model.bin`) -> (config, params)."""
    path = Path(path)
    if not path.is_dir():
        raise PathNotFoundError(f"{path}: not a directory (expected a SNAC model directory)")
    config_path = path / "config.json"
    if not config_path.exists():
        raise PathNotFoundError(f"{path}: no config.json")
    config = SNACConfig.from_json(config_path)
    if (path / "model.safetensors").exists():
        state = load_safetensors_state_dict(path / "model.safetensors")
    elif (path / "pytorch_model.bin").exists():
        state = load_torch_state_dict(path / "pytorch_model.bin")
    else:
        raise PathNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin found")
    return config, state_dict_to_params(state, config)


QUANTIZER_JSON = "quantizer.json"


def save_converted(path: str | os.PathLike, config: SNACConfig, variables: dict[str, Any],
                   quantizer=None) -> None:
    """Write `config.json`, `quantizer.json` and the variables (orbax) to `path`."""
    import dataclasses
    import json

    import orbax.checkpoint as ocp

    import jax

    from codec_jax.paths import as_path

    path = as_path(path)  # local or gs://
    # Every process takes part in the orbax save (each writes its own shards); the JSON
    # files are written once.
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        config.to_json(path / "config.json")
        if quantizer is not None:
            (path / QUANTIZER_JSON).write_text(json.dumps(dataclasses.asdict(quantizer), indent=2))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / PARAMS_SUBDIR, variables, force=True)


def load_converted(path: str | os.PathLike):
    """-> (config, variables, QuantizerConfig) from a directory written by `save_converted`."""
    import json

    import orbax.checkpoint as ocp

    from codec_jax.nn.quantizer import QuantizerConfig
    from codec_jax.paths import as_path

    path = as_path(path)  # local or gs://
    config = SNACConfig.from_json(path / "config.json")
    quantizer = QuantizerConfig()
    if (path / QUANTIZER_JSON).exists():
        quantizer = QuantizerConfig.from_dict(json.loads((path / QUANTIZER_JSON).read_text()))
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(path / PARAMS_SUBDIR, _single_device_target(
            checkpointer.metadata(path / PARAMS_SUBDIR)))
    return config, variables, quantizer


def _single_device_target(metadata: Any) -> Any:
    """A restore target of the saved shapes and dtypes, every array on this process's
    first device. Without one, orbax restores onto the shardings recorded at save time and
    refuses ("Topology mismatch") an export written by a multi-device or multi-process run,
    i.e. every export of a pod-slice or multi-GPU training, on a laptop."""
    import jax

    tree = getattr(metadata, "item_metadata", metadata)  # StepMetadata in newer orbax
    tree = getattr(tree, "tree", tree)
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree,
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
