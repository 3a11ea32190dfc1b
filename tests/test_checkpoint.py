"""Checkpoint import: no code execution, clear errors, orbax round trip."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

import codec_jax
from codec_jax import checkpoint


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_torch_zip(path, payload_pickle: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload_pickle)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")


def _tiny_dir(tmp_path, name="m"):
    config = codec_jax.get_preset("tiny")
    torch.manual_seed(0)
    from snac import SNAC

    model = SNAC(**config.to_dict())
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config.to_dict()))
    return config, model, d


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    config, _, d = _tiny_dir(tmp_path)
    _write_torch_zip(d / "pytorch_model.bin", pickle.dumps({"x": _Exploit(str(marker))}, protocol=2))
    # Sanity: the payload really would run if loaded by an unrestricted unpickler.
    with zipfile.ZipFile(d / "pytorch_model.bin") as z:
        raw = z.read("archive/data.pkl")
    assert b"system" in raw
    with pytest.raises(codec_jax.UnsafeCheckpointError, match=r"posix\.system|os\.system"):
        codec_jax.load_pretrained(str(d))
    assert not marker.exists()


def test_malicious_pickle_inside_real_torch_archive(tmp_path):
    """A genuine torch.save archive whose state dict also smuggles a callable."""
    marker = tmp_path / "pwned2"
    config, model, d = _tiny_dir(tmp_path)
    state = dict(model.state_dict())
    state["evil"] = _Exploit(str(marker))
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(codec_jax.UnsafeCheckpointError):
        checkpoint.load_torch_state_dict(d / "pytorch_model.bin")
    assert not marker.exists()


def test_reads_torch_archive_exactly(tmp_path):
    tensors = {
        "a": torch.randn(3, 4, 5),
        "b": torch.randn(6, 7).t(),  # non-contiguous view
        "c": torch.arange(10, dtype=torch.int64)[2:8],  # storage offset
        "d": torch.randn(4).to(torch.bfloat16),
        "e": torch.tensor(3.5),
    }
    torch.save(tensors, tmp_path / "t.bin")
    loaded = checkpoint.load_torch_state_dict(tmp_path / "t.bin")
    for k, v in tensors.items():
        np.testing.assert_array_equal(loaded[k].astype(np.float64), v.float().numpy().astype(np.float64))
        assert loaded[k].shape == tuple(v.shape)


def test_corrupt_and_missing_files_give_clear_errors(tmp_path):
    config, model, d = _tiny_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        codec_jax.load_pretrained(str(d))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="not a torch zip archive"):
        codec_jax.load_pretrained(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        codec_jax.load_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({"sampling_rate": 1, "bogus": 2}))
    with pytest.raises(ValueError, match="bogus"):
        codec_jax.load_pretrained(str(d))
    with pytest.raises(FileNotFoundError):
        codec_jax.load_pretrained(str(tmp_path / "nope"))


def test_mismatched_state_dict_names_every_problem(tmp_path):
    config, model, d = _tiny_dir(tmp_path)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    del state["encoder.block.0.bias"]
    state["encoder.block.99.weight"] = np.zeros(3, np.float32)
    state["quantizer.quantizers.0.codebook.weight"] = np.zeros((5, 4), np.float32)
    with pytest.raises(codec_jax.CheckpointMismatchError) as info:
        checkpoint.state_dict_to_params(state, config)
    message = str(info.value)
    assert "encoder.block.0.bias" in message
    assert "encoder.block.99.weight" in message
    assert "quantizer/level_0/codebook" in message


@pytest.mark.slow
def test_orbax_round_trip(tmp_path):
    codec = codec_jax.load_pretrained("tiny")
    codec.save(tmp_path / "saved")
    again = codec_jax.load_pretrained(str(tmp_path / "saved"))
    assert again.config == codec.config
    leaves_a = [np.asarray(x) for x in __import__("jax").tree_util.tree_leaves(codec.variables)]
    leaves_b = [np.asarray(x) for x in __import__("jax").tree_util.tree_leaves(again.variables)]
    assert len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(a, b)


_SAVE_SHARDED = '''
import sys
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import codec_jax
from codec_jax.checkpoint import save_converted

assert jax.device_count() == 2
config = codec_jax.get_preset("tiny")
mesh = Mesh(np.asarray(jax.devices()), ("fsdp",))


def place(x):  # split every array with an even first axis over the two devices
    spec = P("fsdp") if x.ndim and x.shape[0] % 2 == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))


variables = jax.tree_util.tree_map(place, codec_jax.init_variables(config, 3))
assert any(len(x.sharding.device_set) == 2 and not x.sharding.is_fully_replicated
           for x in jax.tree_util.tree_leaves(variables))
save_converted(sys.argv[1], config, variables)
flat = jax.tree_util.tree_flatten_with_path(variables)[0]
np.savez(sys.argv[2], **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
'''


@pytest.mark.slow
def test_export_saved_sharded_over_two_devices_loads_on_one(tmp_path):
    """An export written by a run whose arrays were sharded over several devices (a
    multi-GPU or pod-slice training) loads in a one-device process with the same values:
    orbax on its own restores onto the saved topology and refuses ("Topology mismatch")."""
    import subprocess
    import sys

    import jax

    export, values = tmp_path / "export", tmp_path / "values.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run([sys.executable, "-c", _SAVE_SHARDED, str(export), str(values)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    codec = codec_jax.load_pretrained(str(export))
    expected = np.load(values)
    flat = jax.tree_util.tree_flatten_with_path(codec.variables)[0]
    assert {jax.tree_util.keystr(k) for k, _ in flat} == set(expected.files)
    for key, leaf in flat:
        assert len(leaf.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(leaf), expected[jax.tree_util.keystr(key)])
