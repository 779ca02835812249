"""The progress line tells the truth: units done of a total, and an ETA from the rate achieved."""

from __future__ import annotations

import time

import pytest

from ernie_batch.run.progress import estimated_total, eta_seconds, line
from ernie_batch.run.summary import Progress


def progress(**values) -> Progress:
    p = Progress(started=time.monotonic() - 120)
    for k, v in values.items():
        setattr(p, k, v)
    return p


def test_the_total_counts_known_units_and_estimates_the_documents_not_yet_prepared():
    p = progress(documents_total=10, documents_ready=5, units_known=50)
    assert estimated_total(p) == 100  # 10 units a document so far
    p.documents_ready = 10
    p.units_known = 93
    assert estimated_total(p) == 93  # all prepared: exactly what is known


def test_the_eta_follows_the_rate_achieved_in_the_last_minute():
    now = time.monotonic()
    p = progress(documents_total=4, documents_ready=4, units_known=100, units_done=40)
    p.finish_times.extend(now - 59 + i * 2 for i in range(30))  # 30 in the last minute
    assert eta_seconds(p, now) == pytest.approx(60 / (30 / 60), rel=0.01)
    assert "units 40/100" in line(p)


def test_before_answers_the_eta_uses_the_configured_limit_or_says_it_does_not_know():
    p = progress(documents_total=1, documents_ready=1, units_known=216, rate_limit_per_s=2.0)
    assert eta_seconds(p) == pytest.approx(108)
    p.rate_limit_per_s = None
    assert eta_seconds(p) is None and "ETA ?" in line(p)
    p.already_done = 216
    assert eta_seconds(p) == 0.0
