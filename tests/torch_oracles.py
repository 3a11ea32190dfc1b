"""The reference packages used as test oracles: pip `descript-audio-codec` (DAC, with its
`descript-audiotools`) and pip `encodec`, imported as they are, plus weight copying from
their torch modules into this project's parameter trees.

Both packages import torchaudio at module level. PyPI has no torchaudio for torch 2.13 on
CPU (2.11.1, the newest, is a CUDA build linked against torch 2.11 and cannot load here),
and the code the tests run never calls it, with one exception: EnCodec's
`DiscriminatorSTFT` builds `torchaudio.transforms.Spectrogram(normalized=True,
center=False, power=None)`. When torchaudio cannot be imported, a stand-in module provides
exactly that transform, with torchaudio's formula (`torch.stft` divided by the window's L2
norm); any other torchaudio attribute raises, so a reference path that needed more would
fail loudly instead of running something else.

`.ci/run` installs the packages (pinned, some with `--no-deps` because their pins conflict
with this environment); where they are missing the oracle tests skip with the reason.
"""

from __future__ import annotations

import importlib
import sys
import types

import jax.numpy as jnp
import pytest
import torch


class _Spectrogram(torch.nn.Module):
    """torchaudio.transforms.Spectrogram for `power=None` (complex output)."""

    def __init__(self, n_fft=400, win_length=None, hop_length=None, pad=0,
                 window_fn=torch.hann_window, power=2.0, normalized=False, center=True,
                 pad_mode="reflect", onesided=True, **_):
        super().__init__()
        if power is not None or pad or not onesided or normalized not in (True, False, "window"):
            raise NotImplementedError("the torchaudio stand-in only has EnCodec's Spectrogram")
        self.n_fft, self.win_length = n_fft, win_length or n_fft
        self.hop_length = hop_length or self.win_length // 2
        self.window = window_fn(self.win_length)
        self.normalized, self.center, self.pad_mode = bool(normalized), center, pad_mode or "reflect"

    def forward(self, x):
        shape = x.shape
        spec = torch.stft(x.reshape(-1, shape[-1]), self.n_fft, self.hop_length, self.win_length,
                          self.window, center=self.center, pad_mode=self.pad_mode,
                          normalized=False, onesided=True, return_complex=True)
        if self.normalized:  # torchaudio's normalized=True: divide by the window's L2 norm
            spec = spec / self.window.pow(2.0).sum().sqrt()
        return spec.reshape(shape[:-1] + spec.shape[-2:])


def _torchaudio_stand_in() -> types.ModuleType:
    module = types.ModuleType("torchaudio")
    module.__version__ = "0+codec-jax-test-stand-in"
    module.transforms = types.SimpleNamespace(Spectrogram=_Spectrogram)

    def missing(name):
        raise AttributeError(f"torchaudio.{name} is not available: the tests' torchaudio "
                             "stand-in only provides transforms.Spectrogram")

    module.__getattr__ = missing
    return module


def _ensure_torchaudio() -> None:
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):
        sys.modules["torchaudio"] = _torchaudio_stand_in()


def import_reference(module: str, package: str):
    """Import `module` of the pip package `package`, or skip the test saying why."""
    _ensure_torchaudio()
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"oracle package {package} is not importable ({e}); .ci/run installs it")


def conv2d_params(conv: torch.nn.Conv2d) -> dict:
    """A torch Conv2d (plain, or with `torch.nn.utils.weight_norm`) -> this project's
    `WNConv2d` parameters (HWIO `direction` + `magnitude`, or `kernel`; `bias`)."""
    to_hwio = lambda w: jnp.asarray(w.detach().permute(2, 3, 1, 0).numpy())  # noqa: E731
    bias = jnp.asarray(conv.bias.detach().numpy())
    if hasattr(conv, "weight_v"):
        return {"direction": to_hwio(conv.weight_v),
                "magnitude": jnp.asarray(conv.weight_g.detach().flatten().numpy()), "bias": bias}
    return {"kernel": to_hwio(conv.weight), "bias": bias}


def perturb_weight_norm_magnitudes(module: torch.nn.Module, seed: int) -> None:
    """Move every weight-norm magnitude away from ||direction|| (where torch initialises it)
    so that a port that ignored the magnitude would fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if hasattr(sub, "weight_g"):
                sub.weight_g.mul_(torch.rand(sub.weight_g.shape, generator=generator) + 0.5)
