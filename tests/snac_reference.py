"""Build strong reference SNAC models (PyTorch, pip `snac`) for parity tests.

Plain random weights make a weak oracle: latents are bias-dominated and a whole clip maps
to a handful of codes, so a wrong mapping could still "agree". Here every parameter is
moved off its init value and each level's codebook is drawn from the reference's own
projected residuals, so that codes change frame to frame.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from snac import SNAC as TorchSNAC


def make_signals(kind: str, batch: int, samples: int, sample_rate: int, seed: int) -> np.ndarray:
    """Deterministic `[batch, samples]` float32 clips: 'noise', 'speech' or 'music'-like."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / sample_rate
    out = []
    for _ in range(batch):
        if kind == "noise":
            x = rng.normal(0, 0.3, samples)
        elif kind == "speech":
            # Glottal-pulse-like harmonic stack with a gliding pitch, syllable-rate envelope
            # and a little breath noise.
            f0 = rng.uniform(90, 220) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate
            x = sum(np.sin(k * phase) / k ** 1.2 for k in range(1, 25))
            x *= 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3, 6) * t)) ** 2
            x += rng.normal(0, 0.02, samples)
            x *= 0.3 / (np.abs(x).max() + 1e-9)
        elif kind == "music":
            x = np.zeros(samples)
            for _ in range(4):
                f = 110 * 2 ** (rng.integers(0, 36) / 12)
                onset = rng.uniform(0, 0.5) * t[-1]
                env = np.where(t >= onset, np.exp(-(t - onset) * rng.uniform(1, 6)), 0.0)
                x += env * sum(np.sin(2 * np.pi * f * k * t) * 0.5 ** k for k in range(1, 6))
            x *= 0.5 / (np.abs(x).max() + 1e-9)
        else:
            raise ValueError(kind)
        out.append(x)
    return np.stack(out).astype(np.float32)


def perturb_parameters(model: TorchSNAC, seed: int) -> None:
    """Move every parameter off its init value (alphas, magnitudes, biases, LayerNorm)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("alpha"):
                p.copy_(torch.exp(0.4 * noise))  # log-normal around 1, stays positive
            elif name.endswith("original0") or name.endswith("weight_g"):
                p.mul_(torch.exp(0.3 * noise))
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif "norm.weight" in name:
                p.copy_(1 + 0.2 * noise)
            elif "codebook" in name:
                continue  # drawn from latents below
            else:
                p.add_(0.1 * p.std() * noise)


def codebooks_from_latents(model: TorchSNAC, audio: np.ndarray, seed: int) -> None:
    """Set each level's codebook to (noisy) copies of that level's projected residuals."""
    gen = torch.Generator().manual_seed(seed)

    # The walk quantizes each level only after this loop body has set its codebook.
    with torch.no_grad():
        for q, z_e in _walk_levels(model, audio):
            z_e = z_e.reshape(-1, q.codebook_dim)
            pick = torch.randint(0, z_e.shape[0], (q.codebook_size,), generator=gen)
            spread = z_e.std(0, keepdim=True)
            q.codebook.weight.copy_(z_e[pick] + 0.5 * spread * torch.randn(
                q.codebook_size, q.codebook_dim, generator=gen))


def _walk_levels(model: TorchSNAC, audio: np.ndarray):
    """Yield `(level module, projected latents [batch, frames, codebook_dim])` per level, in
    the reference's own residual order; each level quantizes after the consumer's loop body,
    so the consumer may still edit that level's codebook."""
    with torch.no_grad():
        residual = model.encoder(model.preprocess(torch.from_numpy(audio)[:, None]))
        for q in model.quantizer.quantizers:
            z = residual
            if q.stride > 1:
                z = torch.nn.functional.avg_pool1d(z, q.stride, q.stride)
            z_e = q.in_proj(z).transpose(1, 2)
            yield q, z_e
            z_q, _ = q(residual)
            residual = residual - z_q


def build_reference(config_dict: dict, seed: int = 0, calib_seconds: float = 2.0) -> TorchSNAC:
    torch.manual_seed(seed)
    model = TorchSNAC(**config_dict).eval()
    perturb_parameters(model, seed + 1)
    sr = config_dict["sampling_rate"]
    calib = np.concatenate([
        make_signals(kind, 1, int(calib_seconds * sr), sr, seed + 100 + i)
        for i, kind in enumerate(("noise", "speech", "music"))
    ])
    codebooks_from_latents(model, calib, seed + 2)
    return model


def save_hub_directory(model: TorchSNAC, config_dict: dict, path: str, *,
                       legacy_weight_norm: bool = False, safetensors: bool = False) -> str:
    """Write `config.json` + weights the way the published SNAC repositories do."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_dict, f)
    state = model.state_dict()
    if legacy_weight_norm:  # the older `weight_g` / `weight_v` key style
        state = {k.replace("parametrizations.weight.original0", "weight_g")
                  .replace("parametrizations.weight.original1", "weight_v"): v
                 for k, v in state.items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()},
                  os.path.join(path, "model.safetensors"))
    else:
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    return path


def disable_noise(model: TorchSNAC) -> None:
    for m in model.modules():
        if type(m).__name__ == "NoiseBlock":
            m.forward = lambda x: x


def reference_encode(model: TorchSNAC, audio: np.ndarray):
    """-> (latents `[batch, frames, channels]`, codes list of `[batch, frames_level]`)."""
    with torch.no_grad():
        x = model.preprocess(torch.from_numpy(audio)[:, None])
        z = model.encoder(x)
        _, codes = model.quantizer(z)
    return z.numpy().transpose(0, 2, 1), [c.numpy() for c in codes]


def reference_decode(model: TorchSNAC, codes) -> np.ndarray:
    with torch.no_grad():
        return model.decode([torch.from_numpy(np.asarray(c)).long() for c in codes]).numpy()[:, 0]


def reference_margins(model: TorchSNAC, audio: np.ndarray) -> list[np.ndarray]:
    """Per level `[batch, frames]`: distance gap between the reference's best and second-best
    code. A disagreement between implementations is only acceptable where this is tiny."""
    margins = []
    for q, z_e in _walk_levels(model, audio):
        e = torch.nn.functional.normalize(z_e, dim=-1)
        c = torch.nn.functional.normalize(q.codebook.weight, dim=-1)
        dist = (e.pow(2).sum(-1, keepdim=True) - 2 * e @ c.t() + c.pow(2).sum(-1))
        two = dist.topk(2, dim=-1, largest=False).values
        margins.append((two[..., 1] - two[..., 0]).numpy())
    return margins


def code_disagreements(config, got, want, margins, bound: float):
    """Compare one clip's codes (lists per level of `[frames]`). -> (number of differing codes,
    list of the unexplained ones as (level, frame, margin)): a difference is explained if the
    reference's margin there is below `bound`, or if a coarser level already differs over the
    same latent frames (the residual this level quantizes is then another one)."""
    latent = want[-1].shape[0] * config.vq_strides[len(want) - 1]
    upstream = np.zeros(latent, bool)  # latent frames under a differing coarser code
    count, unexplained = 0, []
    for level, (g, w, m) in enumerate(zip(got, want, margins)):
        g, w, m = np.asarray(g), np.asarray(w), np.asarray(m).reshape(-1)
        assert g.shape == w.shape, (level, g.shape, w.shape)
        s = config.vq_strides[level]
        differ = g != w
        inherited = upstream.reshape(-1, s).any(axis=1)
        for frame in np.nonzero(differ & ~inherited & ~(m < bound))[0]:
            unexplained.append((level, int(frame), float(m[frame])))
        count += int(differ.sum())
        upstream |= np.repeat(differ, s)
    return count, unexplained
