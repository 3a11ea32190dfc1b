"""`codec-jax entropy-fit`: fit a context model for entropy-coding codes, and report the
bits it saves.

    codec-jax entropy-fit codes/ -o codes_model.npz

Reads `.snac` files (directories recursively, `@list.txt`), holds out every 10th file,
fits `codec_jax.audio.entropy.ContextModel` on the rest, and prints bits per second of
audio on the held-out files: codes at a fixed width, the adaptive and the context-model
streams (their payload and header apart), and whole `.snac` files of each kind.
Use the model with `codec-jax encode --entropy codes_model.npz` (and `decode
--entropy-model`).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv):
    p = argparse.ArgumentParser(prog="codec-jax entropy-fit", description=__doc__.split("\n")[0])
    p.add_argument("codes", nargs="+", metavar="CODES", help=".snac file, directory or @list.txt")
    p.add_argument("-o", "--output", required=True, help="context model file (.npz) to write")
    p.add_argument("--top-k", type=int, default=64,
                   help="codes kept per context in each conditional table (default 64)")
    p.add_argument("--report", default=None, help="also write the figures (JSON) here")
    args = p.parse_args(argv)

    from codec_jax.audio import codes_file, entropy
    from codec_jax.corpus import collect_inputs
    from codec_jax.errors import UsageError

    files = collect_inputs(args.codes, (codes_file.SUFFIX,))
    if len(files) < 2:
        raise UsageError(f"entropy-fit needs at least 2 codes files, found {len(files)}")
    loaded, meta = [], None
    for f in files:
        c = codes_file.load_codes(f.path)
        sizes = list(c.codebook_sizes)
        strides = tuple(int(s) for s in c.config["vq_strides"])
        if meta is None:
            meta = (sizes, strides, c.model_id, c.sample_rate)
        elif (sizes, strides) != meta[:2]:
            raise UsageError(f"{f.path}: codes of another architecture than {files[0].path}")
        loaded.append(c)
    sizes, strides, model_id, rate = meta

    def streams(c):  # one [frames] list per level for each channel
        return [[lv.reshape(c.channels, -1)[ch].astype("int32") for lv in c.codes] for ch in range(c.channels)]

    held = loaded[::10]  # every 10th file is held out: the figures are on codes the model never saw
    train = [c for i, c in enumerate(loaded) if i % 10] or held
    print(f"fitting on {len(train)} files, evaluating on {len(held)} held-out files", file=sys.stderr)
    model = entropy.ContextModel.fit([s for c in train for s in streams(c)], sizes, strides, top_k=args.top_k)
    model.save(args.output)
    seconds = sum(c.length for c in held) / rate
    bits = dict.fromkeys(("fixed_packed", "fixed_payload", "adaptive", "adaptive_header", "context",
                          "context_header", "file_fixed", "file_adaptive", "file_context"), 0)
    for c in held:
        for levels in streams(c):
            frames = [x.size for x in levels]
            bits["fixed_packed"] += entropy.fixed_width_bits(frames, sizes)
            bits["fixed_payload"] += sum(n * 8 * codes_file.code_dtype(v).itemsize for n, v in zip(frames, sizes))
            for kind, m in (("adaptive", None), ("context", model)):
                stream = entropy.encode(levels, sizes, model=m)
                bits[kind] += 8 * len(stream)
                bits[f"{kind}_header"] += 8 * entropy.header_bytes(stream)
        fields = dict(length=c.length, sample_rate=c.sample_rate, original_sample_rate=c.original_sample_rate,
                      model_id=c.model_id, model_name=c.model_name, config=c.config,
                      codebook_sizes=list(c.codebook_sizes), source=c.source)
        for kind, e in (("fixed", None), ("adaptive", "adaptive"), ("context", model)):
            bits[f"file_{kind}"] += 8 * len(codes_file.encode_codes(c.codes, entropy=e, **fields))
    figures = {k: v / seconds for k, v in bits.items()}
    fixed = figures["fixed_packed"]
    print(f"wrote {args.output} (model {model.model_id.hex()[:12]}; codes of {model_id[:12]})")
    print(f"held-out bits per second of audio ({seconds:.0f} s in {len(held)} files, "
          f"{seconds / len(held):.1f} s per file):")
    print(f"  fixed width {fixed:.0f} (codes packed to ceil(log2 V) bits; the .snac v1 "
          f"payload, whole bytes per code, {figures['fixed_payload']:.0f})")
    for kind in ("adaptive", "context"):
        print(f"  {kind} stream {figures[kind]:.0f} ({figures[kind] / fixed:.1%}): payload "
              f"{figures[kind] - figures[kind + '_header']:.0f} "
              f"({(figures[kind] - figures[kind + '_header']) / fixed:.1%}) + stream header "
              f"{figures[kind + '_header']:.0f}")
    print(f"  whole .snac files (JSON header included): fixed-width {figures['file_fixed']:.0f}, "
          f"adaptive {figures['file_adaptive']:.0f}, context {figures['file_context']:.0f}")
    if args.report:
        with open(args.report, "w") as fh:
            json.dump({"bits_per_second": figures, "held_out_seconds": seconds,
                       "files": {"train": len(train), "held_out": len(held)},
                       "entropy_model": model.model_id.hex(), "codec_model": model_id,
                       "weights": model.weights}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
