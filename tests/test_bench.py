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


@pytest.mark.slow  # a Prefect server, a pool, 1-3 workers a round: about 2 minutes
def test_bench_scale_runs_its_rounds_on_a_pool_with_its_sources_in_a_bucket(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool refuses local sources, so the scenario puts its documents in a loopback
    bucket; here only its 12 s window, at a tiny scale (its figures: `ernie-batch bench`)."""
    from ernie_batch.bench import scale

    monkeypatch.setattr(scale, "WINDOWS_S", (12.0,))
    figures = scenario("scale")(0.02)
    rounds = [figures[f"window_12s_workers_{w}"] for w in (1, 2, 3)]
    assert [r["requests"] for r in rounds] == [figures["requests_per_round"]] * 3 == [24] * 3
    assert figures["sources"].startswith("a bucket") and figures["ratio"] > 0
