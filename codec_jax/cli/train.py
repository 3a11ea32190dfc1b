"""`codec-jax train`: parse flags, then call `codec_jax.training.loop.train_and_evaluate`.

    codec-jax train --config configs/tiny.py --workdir /tmp/run
    python -m codec_jax.cli.train --config snac_24khz.py:finetune --workdir gs://... \
        --config.init.generator_checkpoint=/ckpt/snac_24khz --config.mesh.fsdp=4

A `--config` path that does not exist is looked up by file name among the configs
shipped in `codec_jax/configs/`, so `configs/tiny.py`, `tiny.py` and `tiny` all work.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional


_USAGE = """usage: codec-jax train --config CONFIG.py[:VARIANT] --workdir DIR [--config.KEY=VALUE ...]

  --config        a config file with get_config(arg), e.g. configs/tiny.py or
                  configs/snac_24khz.py:finetune (a bare name such as snac_24khz.py is
                  also looked up among the installed configs)
  --config.K=V    override any config value, e.g. --config.train.batch_size=32
  --workdir       checkpoints, TensorBoard logs and metrics.jsonl go here; an existing
                  run in it is resumed
  --distributed   call jax.distributed.initialize() first (multi-host TPU/GPU jobs)
"""


def _resolve_config_path(argv: list[str]) -> list[str]:
    """Let `--config snac_24khz.py[:variant]` find the configs shipped with the package
    when the path does not exist relative to the current directory."""
    configs_dir = Path(__file__).resolve().parent.parent / "configs"
    out = []
    for i, arg in enumerate(argv):
        prefix = None
        if arg.startswith("--config="):
            prefix, value = "--config=", arg[len("--config="):]
        elif i > 0 and argv[i - 1] == "--config":
            prefix, value = "", arg
        if prefix is not None:
            path, sep, variant = value.partition(":")
            if not os.path.exists(path):
                for candidate in (configs_dir / path, configs_dir / Path(path).name,
                                  configs_dir / f"{path}.py"):
                    if candidate.exists():
                        value = f"{candidate}{sep}{variant}"
                        break
            arg = prefix + value
        out.append(arg)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    """`codec-jax train ...` / `python -m codec_jax.cli.train ...`; returns the exit status."""
    import sys

    from absl import flags
    from ml_collections import config_flags

    from codec_jax.training import loop

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "training config file", flag_values=fv,
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "initialise multi-host JAX", flag_values=fv)
    try:
        fv(["codec-jax train"] + _resolve_config_path(argv))
    except flags.Error as e:
        print(f"codec-jax train: {e}\n\n{_USAGE}", file=sys.stderr)
        return 2
    if fv.config is None or not fv.workdir:
        print(f"codec-jax train: --config and --workdir are required\n\n{_USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if fv.distributed:
        import jax

        jax.distributed.initialize()
    try:
        loop.train_and_evaluate(fv.config, fv.workdir)
    except loop.NonFiniteTrainingError as e:
        print(f"codec-jax train: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
