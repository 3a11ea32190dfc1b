"""Where the GAN train step's device time goes (issue 15 item 2).

Compiles the trainer's own step (`bench_train.compile_gan_step`: the preset's training
config at this batch, crop and compute dtype, one device), times it dispatched back to
back, then records `--trace-steps` steps with the JAX profiler and adds the device time
of every XLA operation up by

* phase: the step's named scopes (`codec_jax/training/step.py`): the generator forward,
  the discriminator update, the real audio's features, the generator losses (mel, the
  fake audio through the discriminator), the generator backward, the optimizer updates;
* direction: forward, or backward (`transpose(...)` in the op's scope);
* module: the Flax module path under the phase, `--depth` levels deep
  (`encoder/block_0`, `mpd_2`, `mrd_1024`);
* kind: what runs (a fusion's kind, a library call such as `__cudnn$convForward` or
  `__cublas$gemm`, or the opcode).

A GPU trace with command buffers on groups many operations into one event, so run it with
them off for the attribution (the step time is reported as it ran):

    XLA_FLAGS=--xla_gpu_enable_command_buffer= python bench/profile_train_step.py \\
        --config snac_24khz --batch 16 --seconds 1.0 --dtype bfloat16 --out /tmp/prof
    JAX_PLATFORMS=cpu python bench/profile_train_step.py --config tiny --batch 2 \\
        --seconds 0.2 --dtype float32 --steps 2 --trace-steps 1     # the CPU check
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from bench.bench_train import compile_gan_step, time_steps  # noqa: E402
from bench.trace_ops import device_time_by_op, hlo_instructions  # noqa: E402
from bench.xla_options import set_layers  # noqa: E402

# The named scopes of `make_train_step`, outermost first; an op inside several (the mel
# loss inside the generator losses) takes the innermost listed here.
PHASES = ("generator_forward", "discriminator_update", "real_features",
          "generator_losses", "generator_backward", "generator_update")
SUB_PHASES = ("mel_loss", "stft_loss", "fake_features")
_WRAPPER = re.compile(r"^[\w.]+\(.*\)$")  # jit(f), jvp(SNAC), transpose(jvp(...)), ...
_UNWRAP = re.compile(r"^(?:[\w.]+\()+([^()]*)\)+$")  # transpose(jvp(mel_loss)) -> mel_loss
_CONTROL = {"cond", "while", "body", "cond_fun", "body_fun", "branch_0_fun", "branch_1_fun",
            "checkpoint", "remat", "rematted_computation"}


def classify(op_name: str, depth: int) -> dict[str, str]:
    """phase, direction and module of one op from its scope (`op_name` metadata)."""
    parts = op_name.split("/") if op_name else []
    # A scope opened inside a transformation is printed wrapped: `jvp(fake_features)`,
    # `transpose(jvp(mel_loss))`.
    names = {_UNWRAP.sub(r"\1", p) for p in parts}
    phase = next((p for p in PHASES if p in names), "other")
    sub = next((p for p in SUB_PHASES if p in names), None)
    if sub:
        phase = f"{phase}/{sub}"
    direction = "backward" if "transpose(" in op_name else "forward"
    modules = [p for p in parts[:-1]  # the last part is the primitive
               if p not in PHASES and p not in SUB_PHASES and p not in _CONTROL
               and not _WRAPPER.match(p) and "." not in p]  # `SNAC.encode_latents`: a method
    module = "/".join(modules[:depth]) or "(no module)"
    return dict(phase=phase, direction=direction, module=module)


def table(title: str, rows: dict, total: float, steps: int, top: int) -> list[dict]:
    """Prints `rows` ({key: ms over all traced steps}) as ms per step and share."""
    ordered = sorted(rows.items(), key=lambda kv: -kv[1])
    print(f"--- {title} (ms per step, share of device time)")
    out = []
    for key, ms in ordered[:top] if top else ordered:
        label = " | ".join(key) if isinstance(key, tuple) else key
        print(f"{ms / steps:9.2f} ms {100 * ms / max(total, 1e-9):5.1f} %  {label}")
        out.append(dict(key=label, ms_per_step=round(ms / steps, 3),
                        share=round(ms / max(total, 1e-9), 4)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="snac_24khz", help="codec_jax.configs module")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the training config (repeatable)")
    p.add_argument("--layers", nargs="*", default=[], metavar="KEY=VALUE",
                   help="codec_jax lowering choices (codec_jax.nn.layers.IMPL), e.g. "
                        "polyphase_weight_grad=conv")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="steps timed back to back")
    p.add_argument("--trace-steps", type=int, default=3)
    p.add_argument("--depth", type=int, default=2, help="module path depth of the tables")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", default=None, help="folder for the JSON and the optimised HLO")
    args = p.parse_args(argv)

    from codec_jax.nn import layers

    set_layers(args.layers)
    device = jax.devices()[0]
    prepared = compile_gan_step(args.config, args.batch, args.seconds, args.dtype, [device],
                                tuple(args.set))
    compiled, batch = prepared["compiled"], prepared["batch"]
    hlo = compiled.as_text()
    info = hlo_instructions(hlo)
    box = [prepared.pop("state")]

    def step():
        box[0], metrics = compiled(box[0], batch)
        return metrics

    step_s = time_steps(step, args.warmup, args.steps)
    audio_s = args.batch * args.seconds
    print(f"step {1000 * step_s:.1f} ms dispatched back to back ({args.steps} steps): "
          f"{audio_s / step_s:.1f} audio-s/s on {device.device_kind}", flush=True)

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(args.trace_steps):
                metrics = step()
            jax.block_until_ready(metrics)
        ops = device_time_by_op(d, 0)
    total = sum(ms for _, ms, _ in ops)
    n = args.trace_steps
    print(f"device time {total / n:.1f} ms per step over {n} traced steps, {len(ops)} ops; "
          f"{sum(1 for o, _, _ in ops if o not in info)} not found in the HLO")

    by = {k: collections.defaultdict(float) for k in
          ("phase", "phase_direction", "module", "kind", "phase_kind")}
    top_ops = []
    for name, ms, calls in ops:
        meta = info.get(name, dict(op_name="", kind="?"))
        c = classify(meta["op_name"], args.depth)
        by["phase"][c["phase"]] += ms
        by["phase_direction"][(c["phase"], c["direction"])] += ms
        by["module"][(c["phase"], c["direction"], c["module"])] += ms
        by["kind"][meta["kind"]] += ms
        by["phase_kind"][(c["phase"], meta["kind"])] += ms
        top_ops.append(dict(op=name, ms_per_step=round(ms / n, 3), calls=calls // n,
                            kind=meta["kind"], op_name=meta["op_name"][:240]))
    result = dict(config=args.config, batch=args.batch, seconds=args.seconds, dtype=args.dtype,
                  overrides=args.set, layers=dict(layers.IMPL), device=device.device_kind, step_ms=round(1000 * step_s, 2),
                  audio_s_per_s=round(audio_s / step_s, 1), device_ms_per_step=round(total / n, 2),
                  xla_flags=os.environ.get("XLA_FLAGS", ""),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    for key, title in (("phase", "by phase"), ("phase_direction", "by phase and direction"),
                       ("kind", "by kind of kernel"), ("phase_kind", "by phase and kind"),
                       ("module", f"by phase, direction and module (depth {args.depth})")):
        result[key] = table(title, by[key], total, n, args.top)
    print(f"--- the {args.top} longest ops")
    for row in top_ops[:args.top]:
        print(f"{row['ms_per_step']:9.2f} ms x{row['calls']:<3d} {row['kind'][:22]:<22} "
              f"{row['op'][:28]:<28} {row['op_name'][:130]}")
    result["top_ops"] = top_ops[:200]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_train_step.json"), "w") as f:
            json.dump(result, f, indent=1)
        with gzip.open(os.path.join(args.out, "train_step.hlo.txt.gz"), "wt") as f:
            f.write(hlo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
