"""Training throughput: JAX generator step vs the reference PyTorch SNAC, and the full
GAN step (audio-seconds per second, model FLOP utilisation, multi-device scaling).

Runs on any backend. On a GPU host (the numbers in BENCHMARKS.md):

    python bench/bench_train.py --preset snac_24khz --batch 16 --seconds 1.0

Quick check on a CPU:

    python bench/bench_train.py --preset tiny --batch 2 --seconds 0.2 --steps 2

Rows:
  * `jax generator`: SNAC forward + backward + AdamW on a waveform L1 loss (factorized
    quantizer, like the reference), jitted, parameters float32, compute in `--dtype`.
  * `torch generator`: the same step with pip `snac` (eager PyTorch, autocast to
    bfloat16 when `--dtype bfloat16`), on CUDA when available.
  * `jax GAN step`: the trainer's full step for the preset's config (EMA quantizer,
    MPD + MRD discriminators, 7-scale mel, adversarial + feature-matching losses,
    discriminator update, both AdamWs) on one device, then data-parallel over all
    local devices with the per-device batch kept (weak scaling) when there are several.

MFU = FLOPs of one step per device / step time / the device's peak dense FLOP/s for the
compute dtype (a table below, or `--peak-tflops`). FLOPs come from XLA's cost analysis of
the unoptimised step (`Lowered.cost_analysis()`): every convolution and matmul, forward
and backward, a multiply-add counted as 2 FLOPs, plus elementwise work. (The compiled
executable's analysis undercounts on GPUs, see `step_flops`.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from codec_jax.training import sharding as shard_lib  # noqa: E402
from codec_jax.config import get_preset  # noqa: E402
from codec_jax.data import synthetic  # noqa: E402
from codec_jax.nn.snac import SNAC  # noqa: E402
from codec_jax.nn.quantizer import QuantizerConfig  # noqa: E402

# Peak dense TFLOP/s per device by (device-kind substring, dtype). Sources: vendor data
# sheets (NVIDIA H100/H200 SXM, A100; Google Cloud TPU pages). float32 on NVIDIA means
# TF32 tensor cores, which XLA uses for float32 matmuls/convolutions at default precision.
PEAK_TFLOPS = {
    ("H200", "bfloat16"): 989.0, ("H200", "float32"): 494.0,
    ("H100 PCIe", "bfloat16"): 756.0, ("H100 PCIe", "float32"): 378.0,
    ("H100", "bfloat16"): 989.0, ("H100", "float32"): 494.0,
    ("A100", "bfloat16"): 312.0, ("A100", "float32"): 156.0,
    ("TPU v4", "bfloat16"): 275.0, ("TPU v5 lite", "bfloat16"): 197.0,
    ("TPU v5e", "bfloat16"): 197.0, ("TPU v5p", "bfloat16"): 459.0,
    ("TPU v6", "bfloat16"): 918.0,
}


def peak_flops(device: jax.Device, dtype: str, override: Optional[float]) -> Optional[float]:
    if override:
        return override * 1e12
    kind = device.device_kind
    for (name, dt), tflops in PEAK_TFLOPS.items():  # first match: specific names first
        if name in kind and dt == dtype:
            return tflops * 1e12
    return None


def time_steps(step: Callable[[], Any], warmup: int, steps: int) -> float:
    """Mean seconds per call of `step` (which returns something to block on)."""
    for _ in range(warmup):
        jax.block_until_ready(step())
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
        out = step()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def step_flops(lowered, num_devices: int = 1) -> Optional[float]:
    """FLOPs per device of one step, from XLA's cost analysis of the *unoptimised* HLO.

    The compiled executable's own analysis cannot be used on GPUs: there XLA has already
    turned convolutions into cuDNN custom calls, which it counts as zero FLOPs (measured:
    30x too few for SNAC). The unoptimised module still holds them as convolutions. It
    describes the global (unpartitioned) step, so a data-parallel step's count is split
    evenly over the devices. Backends behind the PJRT plugin interface (CUDA) do not offer
    this analysis, so there the same unoptimised module is analysed by the host CPU
    backend (a count of operations, independent of where they would run).
    """
    analysis = lowered.cost_analysis()
    if isinstance(analysis, list):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    if not flops:
        try:
            import jax.extend
            from jax._src.lib import _jax  # no public entry point for a module's cost analysis

            module = lowered.compiler_ir("hlo").as_hlo_module()
            cpu = jax.extend.backend.get_backend("cpu")
            flops = _jax.hlo_module_cost_analysis(cpu, module)["flops"]
        except Exception as e:  # a private API: report no MFU rather than lose the timings
            print(f"no FLOP count ({type(e).__name__}: {e}); MFU not computed", file=sys.stderr)
            return None
    return float(flops) / num_devices if flops else None


def audio_batch(batch: int, samples: int, sample_rate: int, seed: int = 0) -> np.ndarray:
    """float32 `[batch, samples]` from the project's synthetic source (tones, chirps,
    noise, mixtures; never silence, whose near-zero samples could time differently)."""
    kinds = tuple(k for k in synthetic.KINDS if k != "silence")
    return np.stack([synthetic.signal_at(seed, i, sample_rate=sample_rate, num_samples=samples,
                                         kinds=kinds)[1] for i in range(batch)])


# ---------------------------------------------------------------------------------------
# JAX generator step
# ---------------------------------------------------------------------------------------

def bench_jax_generator(preset: str, audio: np.ndarray, dtype: str, warmup: int, steps: int
                        ) -> dict[str, Any]:
    config = get_preset(preset)
    model = SNAC(config, dtype=jnp.dtype(dtype), quantizer=QuantizerConfig(kind="factorized"))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, audio.shape[1])))["params"]
    tx = optax.adamw(1e-4, b1=0.8, b2=0.99, weight_decay=0.01)
    opt_state = tx.init(params)

    def step(params, opt_state, audio, key):
        def loss_fn(p):
            out = model.apply({"params": p}, audio, rngs={"noise": key})
            return jnp.mean(jnp.abs(out["audio"].astype(jnp.float32) - audio))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    x = jnp.asarray(audio)
    key = jax.random.key(1)
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, key)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = compiled(state[0], state[1], x, key)
        return loss

    seconds = time_steps(run, warmup, steps)
    return dict(step_s=seconds, flops=step_flops(lowered), compile_s=compile_s,
                params=int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params))))


# ---------------------------------------------------------------------------------------
# PyTorch reference generator step
# ---------------------------------------------------------------------------------------

def bench_torch_generator(preset: str, audio: np.ndarray, dtype: str, warmup: int, steps: int
                          ) -> dict[str, Any]:
    import torch
    from snac import SNAC as TorchSNAC

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Same arithmetic as XLA's default precision: TF32 tensor cores for float32
    # matmuls/convolutions; cuDNN picks its fastest convolution algorithms.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = TorchSNAC(**get_preset(preset).to_dict()).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.8, 0.99), weight_decay=0.01)
    x = torch.from_numpy(audio).to(device)[:, None, :]  # SNAC takes [batch, 1, samples]
    use_autocast = dtype == "bfloat16"

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_autocast):
            audio_hat, _ = model(x)
        loss = torch.nn.functional.l1_loss(audio_hat.float(), x)
        loss.backward()
        opt.step()
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        run()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    sync()
    return dict(step_s=(time.perf_counter() - t0) / steps, device=device,
                params=int(sum(p.numel() for p in model.parameters())))


# ---------------------------------------------------------------------------------------
# Full GAN step through the trainer
# ---------------------------------------------------------------------------------------

def gan_config(preset: str, batch: int, seconds: float, dtype: str, data: int,
               overrides: tuple[str, ...] = ()):
    """The preset's training config at this batch, exact crop and dtype; `overrides` are
    `KEY=VALUE` strings (`discriminator.periods=(2, 3)`), values as Python literals."""
    import ast
    import importlib

    module = importlib.import_module(f"codec_jax.configs.{preset}")
    c = module.get_config()
    c.train.batch_size = batch
    c.data.crop_seconds = seconds  # exact (not rounded to the padding multiple): as the rows above
    c.model.dtype = dtype
    c.mesh.data, c.mesh.fsdp = data, 1
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        *sections, name = key.split(".")
        node = c
        for section in sections:
            node = node[section]
        try:
            node[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[name] = value
    return c


def compile_gan_step(preset: str, batch: int, seconds: float, dtype: str, devices: list,
                     overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Builds the trainer's state on `devices` and compiles its train step (no timing yet)."""
    from codec_jax.training import loop as trainer

    config = gan_config(preset, batch, seconds, dtype, len(devices), overrides)
    setup = trainer.create_training_setup(config, devices=devices)
    t0 = time.perf_counter()
    state = setup.init_state()
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    batch_arrays = shard_lib.make_global_batch(
        {"audio": audio_batch(batch, setup.num_samples, config.data.sample_rate)}, setup.mesh)
    t0 = time.perf_counter()
    lowered = setup.p_train_step.lower(state, batch_arrays)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    print(f"GAN step on {len(devices)} device(s): init {init_s:.1f} s, trace + compile "
          f"{compile_s:.1f} s", flush=True)
    return dict(state=state, batch=batch_arrays, lowered=lowered, compiled=compiled,
                compile_s=compile_s, init_s=init_s, devices=len(devices))


def time_gan_step(prepared: dict[str, Any], warmup: int, steps: int) -> dict[str, Any]:
    box = [prepared.pop("state")]
    compiled, batch_arrays = prepared["compiled"], prepared["batch"]

    def run():
        box[0], metrics = compiled(box[0], batch_arrays)
        return metrics["loss/generator"]

    seconds_per_step = time_steps(run, warmup, steps)
    state = box[0]
    return dict(step_s=seconds_per_step, flops=step_flops(prepared["lowered"], prepared["devices"]),
                compile_s=prepared["compile_s"], init_s=prepared["init_s"],
                gen_params=int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(state.gen_params))),
                disc_params=int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(state.disc_params))))


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="snac_24khz",
                   choices=["tiny", "snac_24khz", "snac_32khz", "snac_44khz"])
    p.add_argument("--batch", type=int, default=16, help="examples per device")
    p.add_argument("--seconds", type=float, default=1.0, help="clip length")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s per device for MFU (default: table by device kind)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-gan", action="store_true")
    p.add_argument("--skip-generator", action="store_true",
                   help="only the GAN step rows (e.g. for a multi-device scaling run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the GAN step's training config, e.g. "
                        "'discriminator.channel_scale=1.0' (repeatable)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    device = jax.devices()[0]
    rate = get_preset(args.preset).sampling_rate
    samples = int(round(args.seconds * rate))
    audio = audio_batch(args.batch, samples, rate)
    audio_s = args.batch * samples / rate
    peak = peak_flops(device, args.dtype, args.peak_tflops)
    rows: list[dict[str, Any]] = []

    def add(name, res, n_devices=1, audio_seconds=audio_s):
        row = dict(name=name, devices=n_devices, batch=int(round(audio_seconds / args.seconds)),
                   step_ms=1e3 * res["step_s"],
                   audio_s_per_s=audio_seconds / res["step_s"])
        flops = res.get("flops")
        row["tflops_per_device"] = flops / res["step_s"] / 1e12 if flops else None
        row["mfu"] = flops / res["step_s"] / peak if (flops and peak) else None
        row.update({k: v for k, v in res.items() if k not in row and k != "step_s"})
        rows.append(row)
        print(json.dumps(row), flush=True)

    if not args.skip_generator:
        add("jax generator (fwd+bwd+AdamW, L1)",
            bench_jax_generator(args.preset, audio, args.dtype, args.warmup, args.steps))
    if not (args.skip_torch or args.skip_generator):
        try:
            res = bench_torch_generator(args.preset, audio, args.dtype, args.warmup, args.steps)
            add(f"torch SNAC generator ({res['device']}, eager)", res)
        except ImportError as e:
            print(f"skipping the PyTorch reference: {e}", file=sys.stderr)
    if not args.skip_gan:
        n = jax.local_device_count()
        jobs = [(args.batch, [device])]
        if n > 1:  # data-parallel over all local devices, per-device batch kept (weak scaling)
            jobs.append((args.batch * n, jax.local_devices()))
        # XLA compiles the two programs in parallel threads (it releases the GIL); the
        # steps are then timed one after the other, never overlapping.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(compile_gan_step, args.preset, b, args.seconds, args.dtype, d,
                                   tuple(args.set)) for b, d in jobs]
            prepared = [f.result() for f in futures]
        add("jax GAN step (G+D, trainer)", time_gan_step(prepared[0], args.warmup, args.steps))
        if n > 1:
            add(f"jax GAN step, data-parallel x{n}",
                time_gan_step(prepared[1], args.warmup, args.steps), n_devices=n,
                audio_seconds=audio_s * n)
            rows[-1]["scaling_efficiency"] = (rows[-1]["audio_s_per_s"]
                                              / (n * rows[-2]["audio_s_per_s"]))

    print()
    print(f"Device: {device.device_kind} ({jax.default_backend()}), JAX {jax.__version__}; "
          f"preset {args.preset}, {args.batch} x {args.seconds:g} s per device, "
          f"compute {args.dtype}, parameters float32; peak "
          + (f"{peak / 1e12:g} TFLOP/s per device" if peak else "unknown (MFU not computed)"))
    print()
    print("| step | devices | batch | step (ms) | audio-s/s | TFLOP/s per device | MFU | scaling |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tf = f"{r['tflops_per_device']:.3g}" if r["tflops_per_device"] else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        sc = f"{100 * r['scaling_efficiency']:.0f}%" if r.get("scaling_efficiency") else "-"
        print(f"| {r['name']} | {r['devices']} | {r['batch']} | {r['step_ms']:.1f} "
              f"| {r['audio_s_per_s']:.1f} "
              f"| {tf} | {mfu} | {sc} |")
    jax_row = next((r for r in rows if r["name"].startswith("jax generator")), None)
    torch_row = next((r for r in rows if r["name"].startswith("torch")), None)
    if jax_row and torch_row:
        print(f"\nJAX / PyTorch generator step speed-up: "
              f"{torch_row['step_ms'] / jax_row['step_ms']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device.device_kind, backend=jax.default_backend(),
                           preset=args.preset, dtype=args.dtype, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
