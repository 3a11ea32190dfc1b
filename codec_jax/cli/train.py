"""`codec-jax train`: parse flags, then call `codec_jax.training.loop.train_and_evaluate`.

    codec-jax train --config configs/tiny.py --workdir /tmp/run
    python -m codec_jax.cli.train --config snac_24khz.py:finetune --workdir gs://... \
        --config.init.generator_checkpoint=/ckpt/snac_24khz --config.mesh.fsdp=4

A `--config` path that does not exist is looked up by file name among the configs
shipped in `codec_jax/configs/`, so `configs/tiny.py`, `tiny.py` and `tiny` all work.

Every mistake in the command (a missing config file, an unknown variant, a config key
that does not exist, a value of the wrong type, a model directory that is not there)
raises `codec_jax.errors.UsageError` *before* JAX is imported or anything is built;
the `codec-jax` dispatcher prints it as one line and exits with status 2. Exit statuses:
0 done, 1 failed work (e.g. training diverged), 2 usage error, and
`train.preemption_exit_code` (default 143) after a SIGTERM save.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from codec_jax.errors import UsageError

_USAGE = """usage: codec-jax train --config CONFIG.py[:VARIANT] --workdir DIR [--config.KEY=VALUE ...]

  --config        a config file with get_config(arg), e.g. configs/tiny.py or
                  configs/snac_24khz.py:finetune (a bare name such as snac_24khz.py is
                  also looked up among the installed configs)
  --config.K=V    override any config value, e.g. --config.train.batch_size=32
  --workdir       checkpoints, TensorBoard logs and metrics.jsonl go here; an existing
                  run in it is resumed
  --distributed   call jax.distributed.initialize() first (multi-host TPU/GPU jobs)

exit status: 0 done (or already done), 1 failed work, 2 usage error,
train.preemption_exit_code (default 143) after a SIGTERM: checkpoint saved, rerun to resume
"""

_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def _shipped_configs() -> list[str]:
    return sorted(p.name for p in _CONFIGS_DIR.glob("*.py")
                  if not p.name.startswith("_") and p.name != "base.py")


def _find_config_file(path: str) -> Path:
    """`path` itself, else the shipped config of that name; `UsageError` if neither."""
    if os.path.exists(path):
        return Path(path)
    for candidate in (_CONFIGS_DIR / path, _CONFIGS_DIR / Path(path).name,
                      _CONFIGS_DIR / f"{path}.py"):
        if candidate.is_file():
            return candidate
    shipped = _shipped_configs()
    near = difflib.get_close_matches(Path(path).name, shipped, n=1)
    hint = f"; did you mean {near[0]}?" if near else ""
    raise UsageError(f"config file {path!r} not found (shipped configs: "
                     f"{', '.join(shipped)}){hint}")


def _resolve_config_path(argv: list[str]) -> list[str]:
    """Let `--config snac_24khz.py[:variant]` find the configs shipped with the package
    when the path does not exist relative to the current directory."""
    out = []
    for i, arg in enumerate(argv):
        prefix = None
        if arg.startswith("--config="):
            prefix, value = "--config=", arg[len("--config="):]
        elif i > 0 and argv[i - 1] == "--config":
            prefix, value = "", arg
        if prefix is not None:
            path, sep, variant = value.partition(":")
            try:
                value = f"{_find_config_file(path)}{sep}{variant}"
            except UsageError:
                pass
            arg = prefix + value
        out.append(arg)
    return out


def load_config(spec: str):
    """`PATH[:VARIANT]` -> the `ConfigDict` of `get_config(VARIANT)` in that file."""
    path_text, _, variant = spec.partition(":")
    path = _find_config_file(path_text)
    module_spec = importlib.util.spec_from_file_location(f"codec_jax_config_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"{path}: not a Python config file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UsageError(f"{path}:{e.lineno}: syntax error: {e.msg}") from e
    if not hasattr(module, "get_config"):
        raise UsageError(f"{path}: defines no get_config(arg) function")
    try:
        return module.get_config(variant) if variant else module.get_config()
    except ValueError as e:
        # e.g. base.apply_variants: "unknown config variant 'x'; choose from (...)"
        raise UsageError(f"{path_text}:{variant}: {e}") from e


def _flatten_keys(config, prefix: str = "") -> list[str]:
    import ml_collections

    keys = []
    for name in config.keys():
        value = config[name]
        dotted = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            keys.extend(_flatten_keys(value, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def check_override_key(config, key: str) -> None:
    """`UsageError` naming the nearest valid keys when `key` (`train.num_steps`) is not
    a value of `config`."""
    import ml_collections

    node: Any = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict):
            section = ".".join(parts[:i])
            raise UsageError(f"unknown config key {key!r}: {section} is a value, not a section")
        if part in node:
            node = node[part]
            continue
        section = ".".join(parts[:i])
        siblings = list(node.keys())
        near = [n for n in siblings if part in n or n in part]
        near += [n for n in difflib.get_close_matches(part, siblings, n=3, cutoff=0.5)
                 if n not in near]
        near = [f"{section}.{n}" if section else n for n in near]
        everywhere = difflib.get_close_matches(key, _flatten_keys(config), n=3, cutoff=0.6)
        near += [k for k in everywhere if k not in near]
        hint = f"; did you mean {', '.join(near[:3])}?" if near else ""
        where = f"section {section!r} has: {', '.join(sorted(siblings))}" if section else \
            f"top-level sections: {', '.join(sorted(siblings))}"
        raise UsageError(f"unknown config key {key!r}{hint} ({where})")


def _split_args(argv: list[str]) -> tuple[Optional[str], Optional[str], bool, list[str]]:
    """-> (config spec, workdir, distributed, `--config.K=V` overrides in order)."""
    config = workdir = None
    distributed = False
    overrides: list[str] = []
    i = 0

    def value_of(flag: str) -> str:
        nonlocal i
        arg = argv[i]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
        if i + 1 >= len(argv):
            raise UsageError(f"{flag} needs a value")
        i += 1
        return argv[i]

    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name == "--config":
            config = value_of("--config")
        elif name == "--workdir":
            workdir = value_of("--workdir")
        elif arg in ("--distributed", "--distributed=true", "--distributed=True"):
            distributed = True
        elif arg in ("--nodistributed", "--distributed=false", "--distributed=False"):
            distributed = False
        elif name.startswith(("--config.", "--noconfig.")):
            overrides.append(arg)
            if "=" not in arg and name.startswith("--config.") and i + 1 < len(argv) \
                    and not argv[i + 1].startswith("--"):
                i += 1
                overrides.append(argv[i])
        else:
            raise UsageError(f"unknown argument {arg!r} (see codec-jax train --help)")
        i += 1
    return config, workdir, distributed, overrides


def parse_args(argv: list[str]):
    """-> (config with the overrides applied, workdir, distributed); `UsageError` for
    any mistake. Imports no JAX."""
    from absl import flags
    from ml_collections import config_flags

    spec, workdir, distributed, overrides = _split_args(argv)
    if not spec or not workdir:
        raise UsageError("--config and --workdir are required (see codec-jax train --help)")
    config = load_config(spec)
    for arg in overrides:
        if arg.startswith(("--config.", "--noconfig.")):
            key = arg.split("=", 1)[0].split(".", 1)[1]
            check_override_key(config, key)
    fv = flags.FlagValues()
    args = ["codec-jax train"] + overrides
    # The override flags are discovered from `sys_argv` when the flag is defined.
    config_flags.DEFINE_config_dict("config", config, "training config", flag_values=fv,
                                    lock_config=True, sys_argv=args)
    try:
        fv(args)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        raise UsageError(lines[0] if lines else f"bad override: {type(e).__name__}") from e
    config = fv.config
    checkpoint = str(config.init.get("generator_checkpoint", "") or "")
    if checkpoint and "://" not in checkpoint and not os.path.isdir(checkpoint):
        raise UsageError(f"init.generator_checkpoint={checkpoint!r}: no such directory "
                         "(expected a SNAC model directory or one written by Codec.save)")
    return config, workdir, distributed


def main(argv: Optional[list[str]] = None) -> int:
    """`codec-jax train ...`; returns the exit status. Raises `UsageError` for a wrong
    command (the `codec-jax` dispatcher prints it as one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0
    config, workdir, distributed = parse_args(argv)

    from codec_jax.errors import Preempted
    from codec_jax.training import loop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if distributed:
        import jax

        jax.distributed.initialize()
    try:
        loop.train_and_evaluate(config, workdir)
    except loop.NonFiniteTrainingError as e:
        print(f"codec-jax train: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        print(f"codec-jax train: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    from codec_jax import cli

    sys.exit(cli.main(["train"] + sys.argv[1:]))
