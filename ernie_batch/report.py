"""Run summaries as tables and text: for the terminal, Prefect artifacts and `--json`."""

from __future__ import annotations

from typing import Any

from ernie_batch.engine import RunSummary


def summary_rows(s: RunSummary) -> list[tuple[str, str]]:
    rows = [
        ("run", s.run_id),
        ("outcome", s.outcome),
        ("files", str(s.documents)),
        ("pages ok", str(s.units_ok)),
        ("pages failed", str(s.units_failed)),
        ("pages skipped", str(s.units_skipped)),
        ("duplicates (no request)", str(s.units_duplicate)),
        ("requests", f"{s.requests} ({s.rate_limited} rate-limited)"),
        ("credits", f"{s.credits:,.4f}"),
        ("USD", f"{s.usd:.6f}"),
        ("duration", f"{s.duration_s:.1f} s"),
        ("parquet", s.output),
    ]
    if s.units_not_sent:
        rows.insert(7, ("pages not sent", str(s.units_not_sent)))
    if s.discovery_skipped:
        passed = ", ".join(f"{k}: {v}" for k, v in sorted(s.discovery_skipped.items()))
        rows.insert(3, ("files passed over", passed))
    if s.error:
        rows.append(("error", s.error))
    return rows


def summary_table(s: RunSummary) -> list[dict[str, Any]]:
    return [{"what": k, "value": v} for k, v in summary_rows(s)]


def summary_markdown(s: RunSummary) -> str:
    lines = [f"# ernie-batch {s.kind} run `{s.run_id}`: {s.outcome}", ""]
    lines += [f"- **{k}**: {v}" for k, v in summary_rows(s)]
    if s.top_errors:
        lines += ["", "## Top errors", ""]
        lines += [f"- {n} × {msg}" for msg, n in s.top_errors]
    return "\n".join(lines) + "\n"
