"""Lowering choices from the command line, for the benches that compare them: XLA compile
options (`profile_decode.py`, `bench_compile_options.py`) and codec_jax's own layer
lowerings (`--layers` of `bench_codec.py` and `profile_train_step.py`)."""

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


def set_layers(items) -> None:
    """Applies `KEY=VALUE` items (`true`/`false` as bools) with
    `codec_jax.nn.layers.set_lowering`; an unknown key or value stops the bench."""
    from codec_jax.nn import layers

    choices = {}
    for item in items:
        key, _, value = item.partition("=")
        choices[key] = {"true": True, "false": False}.get(value.lower(), value)
    try:
        layers.set_lowering(**choices)
    except ValueError as e:
        raise SystemExit(f"--layers: {e}") from None
