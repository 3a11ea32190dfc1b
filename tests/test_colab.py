"""The Colab notebooks run top to bottom on the embedded defaults (few training steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

NOTEBOOK = Path(__file__).parent.parent / "colab" / "quickstart.ipynb"


@pytest.mark.long
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEC_JAX_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("CODEC_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.chdir(NOTEBOOK.parent.parent)
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), namespace)
    assert [c.shape[1] for c in namespace["codes"]] == namespace["codec"].config.frames_per_level(
        namespace["audio"].shape[1])
    assert namespace["decoded"].shape == namespace["audio"].shape
    assert namespace["metrics"], "training returned no metrics"
    assert any((tmp_path / "run").iterdir())


TRAIN_NOTEBOOK = NOTEBOOK.parent / "train.ipynb"


def run_notebook(path: Path) -> dict:
    namespace: dict = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(path), "exec"), namespace)
    return namespace


@pytest.mark.long
def test_train_notebook_prepares_data_trains_resumes_and_exports(tmp_path, monkeypatch, capsys):
    """train.ipynb top to bottom on CPU with the tiny config: synthetic wav files through
    prepare-data, 2 steps, then a rerun to 4 steps that resumes from the checkpoint."""
    from jax.experimental.compilation_cache import compilation_cache
    import jax

    previous_cache = jax.config.jax_compilation_cache_dir
    run_dir = tmp_path / "run"
    for key, value in dict(CONFIG="tiny", STEPS="2", RUN_DIR=str(run_dir), MOUNT_DRIVE="0",
                           DEMO_DATA="synthetic", DATA_DIR=str(tmp_path / "tfds")).items():
        monkeypatch.setenv(f"CODEC_JAX_{key}", value)
    monkeypatch.chdir(NOTEBOOK.parent.parent)
    try:
        first = run_notebook(TRAIN_NOTEBOOK)
        assert first["config"].data.sources[0]["kind"] == "tfds"
        assert (tmp_path / "tfds" / "synthetic_16k").is_dir()
        monkeypatch.setenv("CODEC_JAX_STEPS", "4")
        second = run_notebook(TRAIN_NOTEBOOK)
    finally:
        jax.config.update("jax_compilation_cache_dir", previous_cache)
        compilation_cache.reset_cache()
    out = capsys.readouterr().out
    assert "already in" in out                          # the dataset was reused
    assert "(step 2)" in out                            # the second run resumed
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4
    assert second["reconstruction"].shape == second["original"].shape
    assert np.isfinite(second["snr"])
    assert Path(second["archive"]).is_file()
