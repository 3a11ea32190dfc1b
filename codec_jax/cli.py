"""`codec-jax` command line: one entry point, sub-commands dispatched lazily.

Each sub-command lives in the module that owns the feature and exposes
`main(argv: list[str]) -> int | None`; importing JAX-heavy modules only when a
sub-command runs keeps `codec-jax --help` fast.
"""

from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "encode": ("codec_jax.tools", "encode_main", "audio file(s) -> codes (.npz)"),
    "decode": ("codec_jax.tools", "decode_main", "codes (.npz) -> audio file"),
    "roundtrip": ("codec_jax.tools", "roundtrip_main", "encode + decode an audio file, report quality"),
    "convert": ("codec_jax.tools", "convert_main", "SNAC checkpoint dir -> orbax params dir"),
    "train": ("codec_jax.trainer", "main", "train a codec (configs/*.py)"),
    "prepare-data": ("codec_jax.data.prepare", "main", "audio folder -> TFDS array_record dataset"),
}


def _usage() -> str:
    lines = ["usage: codec-jax <command> [args...]", "", "commands:"]
    for name, (_, _, help_text) in _COMMANDS.items():
        lines.append(f"  {name:<14}{help_text}")
    lines.append("")
    lines.append("`codec-jax <command> --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in _COMMANDS:
        print(f"codec-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = _COMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
