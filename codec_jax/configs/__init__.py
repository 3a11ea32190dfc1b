"""Training configurations: `get_config(arg)` per file, used as `--config configs/X.py:arg`."""
