"""`codec-jax entropy-fit`: fit a context model for entropy-coding codes, and report the
bits it saves.

    codec-jax entropy-fit codes/ -o codes_model.npz

Reads `.snac` files (directories recursively, `@list.txt`), holds out every 10th file,
fits `codec_jax.audio.entropy.ContextModel` on the rest, and prints bits per second on
the held-out files for the fixed-width format, the adaptive model and the context model.
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
    clips, meta = [], None
    for f in files:
        c = codes_file.load_codes(f.path)
        sizes = list(c.codebook_sizes)
        strides = tuple(int(s) for s in c.config["vq_strides"])
        if meta is None:
            meta = (sizes, strides, c.model_id, c.sample_rate, c.config)
        elif (sizes, strides) != meta[:2]:
            raise UsageError(f"{f.path}: codes of another architecture than {files[0].path}")
        for ch in range(c.channels):
            clips.append((c.length, [lv.reshape(c.channels, -1)[ch].astype("int32") for lv in c.codes]))
    sizes, strides, model_id, rate, config = meta
    held = clips[::10]
    train = [c for i, c in enumerate(clips) if i % 10] or held
    print(f"fitting on {len(train)} code streams, evaluating on {len(held)} held-out streams",
          file=sys.stderr)
    model = entropy.ContextModel.fit([c for _, c in train], sizes, strides, top_k=args.top_k)
    model.save(args.output)
    seconds = sum(n for n, _ in held) / rate
    bits = {"fixed": 0, "adaptive": 0, "context": 0}
    for _, levels in held:
        bits["fixed"] += entropy.fixed_width_bits([x.size for x in levels], sizes)
        bits["adaptive"] += 8 * len(entropy.encode(levels, sizes))
        bits["context"] += 8 * len(entropy.encode(levels, sizes, model=model))
    figures = {k: v / seconds for k, v in bits.items()}
    print(f"wrote {args.output} (model {model.model_id.hex()[:12]}; codes of {model_id[:12]})")
    print(f"held-out bits per second: fixed-width {figures['fixed']:.0f}, adaptive "
          f"{figures['adaptive']:.0f} ({figures['adaptive'] / figures['fixed']:.1%}), context "
          f"{figures['context']:.0f} ({figures['context'] / figures['fixed']:.1%})")
    if args.report:
        with open(args.report, "w") as fh:
            json.dump({"bits_per_second": figures, "held_out_seconds": seconds,
                       "streams": {"train": len(train), "held_out": len(held)},
                       "entropy_model": model.model_id.hex(), "codec_model": model_id,
                       "weights": model.weights}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
