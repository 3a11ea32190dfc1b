"""bench/quality_curve.py's --fit-last-step arithmetic: the step a last call can reach."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality_curve as qc  # noqa: E402


def test_median_step_time_ignores_the_compiling_window_and_bad_lines(tmp_path):
    assert qc._median_step_time(tmp_path) is None  # no metrics.jsonl yet
    rows = [{"step": 100, "train/perf/step_time_s": 2.2}]  # the first window holds the compile
    rows += [{"step": 100 * i, "train/perf/step_time_s": t} for i, t in ((2, 0.08), (3, 0.07), (4, 0.09))]
    rows += [{"step": 400, "eval/mel": 3.0}]  # eval rows carry no step time
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn line")
    assert qc._median_step_time(tmp_path) == 0.09  # sorted [0.07, 0.08, 0.09, 2.2], index 2


def test_reachable_step_rounds_down_to_hundreds_after_the_restart():
    # 500 s left, 90 s to restart: 410 s / 0.09 s = 4555 steps -> 4500 more.
    assert qc._reachable_step(3000, 0.09, 500, 90) == 7500
    assert qc._reachable_step(3000, 0.09, 95, 90) is None  # 55 steps: not worth a row
    assert qc._reachable_step(3000, 0.09, 10, 90) is None  # less than the restart itself
