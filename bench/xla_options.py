"""XLA compile options from the command line, for the benches that compare option sets
(`profile_decode.py`, `bench_compile_options.py`)."""

from __future__ import annotations


def parse_options(text: str, aliases: dict[str, str] | None = None) -> dict:
    """`KEY=VALUE[,KEY=VALUE]` as a compile-options dict: `true`/`false` become bools,
    integers ints, anything else stays a string; `aliases` renames short keys
    (`{"autotune": "xla_gpu_autotune_level"}`). A malformed item stops the bench."""
    options = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if not key or not value:
            raise SystemExit(f"XLA options {text!r}: want KEY=VALUE[,KEY=VALUE]")
        key = (aliases or {}).get(key, key)
        lowered = value.lower()
        if lowered in ("true", "false"):
            options[key] = lowered == "true"
        elif value.lstrip("-").isdigit():
            options[key] = int(value)
        else:
            options[key] = value
    return options
