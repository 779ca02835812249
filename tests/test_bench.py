"""The benchmark scenarios that assign config values run at a tiny scale and report whole runs
(figures are measured by `ernie-batch bench`, never asserted here)."""

from __future__ import annotations

import pytest

from ernie_batch.bench import scenario


@pytest.mark.slow  # a simulator process and three rounds each way: 7-16 s a scenario
@pytest.mark.parametrize("name", ["overhead", "sporadic"])
def test_a_scenario_runs_at_a_tiny_scale_and_every_page_is_answered(name: str) -> None:
    figures = scenario(name)(0.01)
    assert figures["scenario"] == name and figures["ratio"] > 0
    if name == "overhead":
        assert figures["pages_ok"] == figures["pages"] == 10
