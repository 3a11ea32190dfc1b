"""The Colab notebook runs top to bottom on the embedded defaults (few training steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent.parent / "colab" / "quickstart.ipynb"


@pytest.mark.slow
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
