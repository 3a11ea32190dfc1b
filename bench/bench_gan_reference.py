"""Reference GAN train step in PyTorch: the SNAC generator (pip `snac`) with DAC's
discriminator and losses (pip `descript-audio-codec`), DAC's recipe, timed per step.

The step is DAC's `scripts/train.py` loop: one generator forward; the discriminator
loss on the detached reconstruction, its backward, grad-norm clipping to 10 and an AdamW
step; then mel (weight 15), adversarial (1) and feature-matching (2) losses against the
updated discriminator plus the quantizer's commitment (0.25) and codebook (1) losses,
one backward through discriminator and generator, clipping to 1e3 and an AdamW step
(lr 1e-4, betas 0.8/0.99, both models). SNAC's forward returns no quantizer losses, so
the quantizer is run level by level here with DAC's losses on each level's projected
latent (`z_e`) and code vector -- the same arithmetic as SNAC's own forward.

Variants: `--compile` wraps generator and discriminator in `torch.compile` (the losses,
built on audiotools' STFT, stay eager); `--dtype bfloat16` runs forwards under
`torch.autocast(bfloat16)` (parameters and optimizer float32), as ours computes in bf16.

Install (descript-audio-codec pins old torch/numpy; its code needs only these):

    pip install --no-deps descript-audio-codec descript-audiotools argbind julius \
        flatten_dict ffmpy importlib_resources randomname pystoi torchaudio

torchaudio must match the installed torch; DAC's discriminator and losses use only its
Python parts (on this CPU image torchaudio 2.11.1 with its `lib/*.so` removed imports
fine next to torch 2.13).

    # CPU, the small size of BENCHMARKS.md's CPU row (same as bench_train.py's command there)
    python bench/bench_gan_reference.py --preset tiny --batch 2 --seconds 0.25 \
        --periods 2 3 --fft-sizes 256 --mel-windows 64 128 256 512 --n-mels 10 20 40 80
    # one H200: DAC's full discriminator and 7-scale mel at snac_24khz, 16 x 1 s
    python bench/bench_gan_reference.py --preset snac_24khz --batch 16 --seconds 1.0 \
        --dtype bfloat16 --compile both
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# DAC conf/base.yml
DAC_MEL_WINDOWS = [32, 64, 128, 256, 512, 1024, 2048]
DAC_N_MELS = [5, 10, 20, 40, 80, 160, 320]
LAMBDAS = {"mel": 15.0, "adversarial": 1.0, "feature_matching": 2.0, "commitment": 0.25,
           "codebook": 1.0}


def snac_forward_with_vq_losses(model, audio):
    """SNAC's forward (`snac.SNAC.forward`) with DAC's per-level VQ losses.

    audio `[B, 1, T]` -> (reconstruction `[B, 1, T]`, commitment loss, codebook loss);
    the losses are summed over levels, each a mean over batch, channels and frames.
    """
    import torch.nn.functional as F

    length = audio.shape[-1]
    z = model.encoder(model.preprocess(audio))
    z_q, residual = 0.0, z
    commitment, codebook = 0.0, 0.0
    for vq in model.quantizer.quantizers:
        x = F.avg_pool1d(residual, vq.stride, vq.stride) if vq.stride > 1 else residual
        z_e = vq.in_proj(x)
        code_vec, _ = vq.decode_latents(z_e)
        commitment = commitment + F.mse_loss(z_e, code_vec.detach())
        codebook = codebook + F.mse_loss(code_vec, z_e.detach())
        out = vq.out_proj(z_e + (code_vec - z_e).detach())  # straight-through
        if vq.stride > 1:
            out = out.repeat_interleave(vq.stride, dim=-1)
        z_q = z_q + out
        residual = residual - out
    return model.decoder(z_q)[..., :length], commitment, codebook


def build(args):
    import torch
    from audiotools import AudioSignal
    from dac.model.discriminator import Discriminator
    from dac.nn import loss as dac_loss
    from snac import SNAC

    from codec_jax.config import get_preset

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True  # XLA's default float32 arithmetic on GPUs
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    snac_config = get_preset(args.preset)
    rate = snac_config.sampling_rate
    generator = SNAC(**snac_config.to_dict()).to(device).train()
    discriminator = Discriminator(periods=list(args.periods), fft_sizes=list(args.fft_sizes),
                                  sample_rate=rate).to(device).train()
    mel_loss = dac_loss.MelSpectrogramLoss(
        n_mels=list(args.n_mels), window_lengths=list(args.mel_windows),
        mel_fmin=[0.0] * len(args.n_mels), mel_fmax=[None] * len(args.n_mels),
        pow=1.0, clamp_eps=1e-5, mag_weight=0.0)
    gan_loss = dac_loss.GANLoss(discriminator)
    opt_g = torch.optim.AdamW(generator.parameters(), lr=1e-4, betas=(0.8, 0.99))
    opt_d = torch.optim.AdamW(discriminator.parameters(), lr=1e-4, betas=(0.8, 0.99))
    # `generator`'s own forward returns no VQ losses: compile the forward used here.
    g_fwd = functools.partial(snac_forward_with_vq_losses, generator)
    if args.compile in ("generator", "both"):
        g_fwd = torch.compile(g_fwd)
    if args.compile in ("discriminator", "both"):
        gan_loss.discriminator = torch.compile(discriminator)

    from bench_train import audio_batch  # the same synthetic clips as ours

    samples = int(round(args.seconds * rate))
    x = torch.from_numpy(audio_batch(args.batch, samples, rate)).to(device)[:, None, :]
    real = AudioSignal(x, rate)
    autocast = dict(device_type=device, dtype=torch.bfloat16,
                    enabled=args.dtype == "bfloat16")

    def step() -> dict[str, torch.Tensor]:
        with torch.autocast(**autocast):
            y, commitment, codebook = g_fwd(x)
        fake = AudioSignal(y.float(), rate)
        with torch.autocast(**autocast):
            loss_d = gan_loss.discriminator_loss(fake, real)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        torch.nn.utils.clip_grad_norm_(discriminator.parameters(), 10.0)
        opt_d.step()
        with torch.autocast(**autocast):
            out = dict(mel=mel_loss(fake, real))
            out["adversarial"], out["feature_matching"] = gan_loss.generator_loss(fake, real)
            out["commitment"], out["codebook"] = commitment, codebook
            loss_g = sum(LAMBDAS[k] * v for k, v in out.items())
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        torch.nn.utils.clip_grad_norm_(generator.parameters(), 1e3)
        opt_g.step()
        return dict(out, generator=loss_g.detach(), discriminator=loss_d.detach())

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    params = dict(generator=sum(p.numel() for p in generator.parameters()),
                  discriminator=sum(p.numel() for p in discriminator.parameters()))
    return step, sync, device, samples / rate * args.batch, params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="snac_24khz",
                   choices=["tiny", "snac_24khz", "snac_32khz", "snac_44khz"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--compile", default="none",
                   choices=["none", "generator", "discriminator", "both"],
                   help="torch.compile these modules")
    p.add_argument("--periods", type=int, nargs="+", default=[2, 3, 5, 7, 11])
    p.add_argument("--fft-sizes", type=int, nargs="+", default=[2048, 1024, 512],
                   help="MRD window lengths")
    p.add_argument("--mel-windows", type=int, nargs="+", default=DAC_MEL_WINDOWS)
    p.add_argument("--n-mels", type=int, nargs="+", default=DAC_N_MELS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if len(args.mel_windows) != len(args.n_mels):
        p.error("--mel-windows and --n-mels need the same number of entries")

    t0 = time.perf_counter()
    step, sync, device, audio_seconds, params = build(args)
    first = None
    for i in range(args.warmup):
        losses = step()
        sync()
        if i == 0:
            first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses = step()
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    import torch

    row = dict(name=f"torch SNAC + DAC GAN step ({device}, "
                    f"{'eager' if args.compile == 'none' else 'compile ' + args.compile})",
               preset=args.preset, batch=args.batch, seconds=args.seconds, dtype=args.dtype,
               step_ms=1e3 * step_s, audio_s_per_s=audio_seconds / step_s,
               first_step_s=first, params=params,
               torch=torch.__version__, threads=torch.get_num_threads(),
               losses={k: float(v) for k, v in losses.items()})
    print(json.dumps(row))
    if not all(torch.isfinite(torch.as_tensor(v)) for v in row["losses"].values()):
        print("non-finite losses", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
