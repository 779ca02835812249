"""The review's charts with data of the shapes real outputs have: one run, a few runs, many.

The selections are built as `review.gather` builds them (cards -> `totals`), from rows of
the shapes a user's output has: a run's pages, a day's three runs with one slow answer,
sixty daily runs. Whether their text stays apart on screen is checked in a real browser
(tests/test_review_browser.py, `slow`); here, what can be read off the SVG and the bins.
"""

from __future__ import annotations

import functools
import math
import random
import re
from datetime import UTC, datetime, timedelta

import pytest

from ernie_batch.review import charts
from ernie_batch.review.build import chart_svgs
from ernie_batch.review.gather import Card, Totals, totals
from ernie_batch.store import PageRow

STATUSES = ["ok"] * 20 + ["invalid_answer", "api_error", "input_error", "duplicate", "skipped"]
OUTLIER_S = 1.8


def selection(runs: int, pages_per_run: int = 10, seed: int = 24) -> Totals:
    """The totals of `runs` runs: hourly-ish runs of one day for a few, daily for many; answers
    in 0.2-0.5 s, and one of 1.8 s in the last run."""
    rng = random.Random(seed)
    start = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    cards = []
    for r in range(runs):
        at = start + (timedelta(days=r, minutes=rng.randrange(60)) if runs > 20
                      else timedelta(minutes=37 * r))
        run_id = f"{at:%Y%m%dT%H%M%SZ}-{rng.getrandbits(24):06x}"
        for p in range(pages_per_run):
            status = rng.choice(STATUSES)
            latency = rng.uniform(0.2, 0.5) if status in ("ok", "invalid_answer") else None
            if r == runs - 1 and p == 0:
                status, latency = "ok", OUTLIER_S
            credits = rng.uniform(900, 1900) if latency is not None else 0.0
            row = PageRow(run_id=run_id, key=f"{r}-{p}", fingerprint="f" * 64,
                          source_path=f"/srv/inbox/doc-{r}-{p}.pdf", source_sha256=f"{r}-{p}",
                          doc_type="pdf", page=1, page_last=1, page_count=1, status=status,
                          error=None, model="m", started_at=at, finished_at=at,
                          attempts=1 if latency else 0, credits=credits, latency_s=latency)
            cards.append(Card(row=row, fields=(), date=f"{at:%Y-%m-%d}"))
    return totals(cards)


SHAPES = {"1 run": 1, "3 runs": 3, "60 runs": 60}


@functools.cache
def drawn(runs: int) -> tuple[Totals, list[str]]:
    """A selection of `runs` runs and its three charts (drawn once for the tests here)."""
    t = selection(runs)
    return t, chart_svgs(t)


def texts(svg: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", t) for t in re.findall(r"<text\b[^>]*>(.*?)</text>", svg, re.S)]


@pytest.mark.parametrize("shape", SHAPES)
def test_credits_bars_are_named_by_short_distinct_labels(shape):
    t, svgs = drawn(SHAPES[shape])
    svg = svgs[0]
    labels = [x for x in texts(svg) if x in charts.bar_labels(list(t.credits_by))]
    assert labels, "no bar is named"
    assert len(set(labels)) == len(labels)
    assert all(len(x) <= 20 for x in labels)
    if shape != "60 runs":  # every run named: time of day and the run id's own suffix
        assert len(labels) == len(t.credits_by)
        assert all(run_id[-6:] in label for run_id, label in
                   zip(t.credits_by, charts.bar_labels(list(t.credits_by)), strict=True))


def test_many_bars_show_every_kth_label_not_a_smear():
    t, svgs = drawn(60)
    assert t.credits_by_what == "day" and len(t.credits_by) == 60
    shown = [x for x in texts(svgs[0]) if x in charts.bar_labels(list(t.credits_by))]
    assert 4 <= len(shown) <= 20


def test_one_slow_answer_does_not_squeeze_the_rest_into_one_bin():
    values = drawn(3)[0].latencies
    assert max(values) == OUTLIER_S
    edges = charts.latency_bins(values)
    counts = [sum(1 for v in values if lo <= v < hi or (hi == edges[-1] and v == hi))
              for lo, hi in zip(edges, edges[1:], strict=False)]
    bulk = [c for (lo, _), c in zip(zip(edges, edges[1:], strict=False), counts, strict=True)
            if lo < 0.5 and c]
    assert len(bulk) >= 4  # the 0.2-0.5 s answers keep their shape
    assert counts[-1] == 1 and edges[-2] > 1.0  # the outlier is a bar of its own
    assert sum(counts) == len(values)


def test_the_latency_chart_names_its_quantiles_and_maximum_outside_the_bars():
    t, svgs = drawn(3)
    svg = svgs[2]
    words = " ".join(texts(svg))
    ordered = sorted(t.latencies)
    p95 = ordered[math.ceil(0.95 * len(ordered)) - 1]
    assert f"p95 {p95:.2f} s" in words and f"max {OUTLIER_S:.2f} s" in words
    assert "log" in words  # a log axis says so


def test_equal_latencies_and_no_latencies_still_draw():
    assert len(charts.latency_bins([0.3] * 5)) >= 2
    assert "no answered requests" in chart_svgs(Totals())[2]
