"""The repository's own contracts: CI runs exactly the README's test commands, and the
test tiers select what README says they do."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_test_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("## Run the tests"):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [re.split(r"\s+#", line)[0].rstrip() for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_commands():
    ci = (REPO / ".ci" / "run").read_text()
    ci_commands = [line.split("run_tests ", 1)[1] for line in ci.splitlines()
                   if line.startswith("run_tests ")]
    assert ci_commands, "no run_tests lines in .ci/run"
    assert ci_commands == _readme_test_commands()[:len(ci_commands)]
    assert 'if [ "$rc" -eq 5 ]' in ci  # pytest's "no tests collected" fails CI


def test_long_tests_count_as_slow():
    """tests/test_cli.py has unmarked, `slow` and `long` tests: -m "not slow" must leave
    out both marked kinds, -m "slow and not long" only the middle tier."""
    def start(expr):  # the three collections run at once (each imports jax: ~5 s)
        return subprocess.Popen([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", expr,
                                 "-p", "no:cacheprovider", "tests/test_cli.py"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def collected(proc):
        out = proc.communicate(timeout=300)[0]
        return {line.split("::", 1)[1] for line in out.splitlines() if "::" in line}

    procs = [start(expr) for expr in ("not slow", "slow and not long", "long")]
    fast, middle, long = (collected(p) for p in procs)
    assert "test_sigterm_leaves_no_partial_files_and_the_rerun_finishes" in long
    assert "test_encode_decode_directory_round_trip_with_a_bad_file" in middle
    assert fast and not (fast & long) and not (fast & middle) and not (middle & long)
