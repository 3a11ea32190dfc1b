"""Test tiers (markers declared in pyproject.toml):

- unmarked: the fast subset, `python -m pytest -m "not slow"` (a few minutes on 2 cores);
- `slow`: seconds to a minute each (full-size presets, several compilations);
- `long`: minutes each (GAN training runs, subprocesses, notebooks). Every `long` test is
  also `slow`, so `-m "not slow"` leaves both out and `-m "slow and not long"` selects
  the middle tier. `.ci/run` says which of them CI runs.
"""

import pytest


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection reads the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("long") is not None and item.get_closest_marker("slow") is None:
            item.add_marker("slow")
