"""`codec-jax` command line: one entry point, sub-commands dispatched lazily.

Each sub-command lives in the module that owns the feature and exposes
`main(argv: list[str]) -> int | None`; importing JAX-heavy modules only when a
sub-command runs keeps `codec-jax --help` fast.
"""

from __future__ import annotations

import importlib
import os
import sys

_COMMANDS = {
    "encode": ("codec_jax.cli.codec", "encode_main", "audio files/dirs -> codes (.snac files or shards)"),
    "decode": ("codec_jax.cli.codec", "decode_main", "codes (.snac) -> audio files"),
    "roundtrip": ("codec_jax.cli.codec", "roundtrip_main", "encode + decode an audio file, report quality"),
    "convert": ("codec_jax.cli.codec", "convert_main", "SNAC checkpoint dir -> orbax params dir"),
    "train": ("codec_jax.cli.train", "main", "train a codec (codec_jax/configs/*.py)"),
    "prepare-data": ("codec_jax.cli.prepare", "main", "audio folder -> TFDS array_record dataset"),
    "eval": ("codec_jax.cli.eval", "main", "measure a codec on audio files: metrics, report"),
    "entropy-fit": ("codec_jax.cli.entropy", "main", "codes files -> context model for --entropy"),
}


def _usage() -> str:
    lines = ["usage: codec-jax <command> [args...]", "", "commands:"]
    for name, (_, _, help_text) in _COMMANDS.items():
        lines.append(f"  {name:<14}{help_text}")
    lines.append("")
    lines.append("`codec-jax <command> --help` for a command's options; `--debug` (or")
    lines.append("CODEC_JAX_DEBUG=1) shows the full traceback of an error.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("CODEC_JAX_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in _COMMANDS:
        print(f"codec-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = _COMMANDS[name]
    from codec_jax.errors import UserError

    try:
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(rest)
    except UserError as e:
        if debug:
            raise
        print(f"codec-jax {name}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"codec-jax {name}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
