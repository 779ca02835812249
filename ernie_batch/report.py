"""Run summaries as tables and text: for the terminal, Prefect artifacts and `--json`."""

from __future__ import annotations

from typing import Any

from ernie_batch.summary import RunSummary
from ernie_batch.vocab import FAILED, UnitStatus


def summary_rows(s: RunSummary) -> list[tuple[str, str]]:
    rows = [
        ("run", s.run_id),
        ("outcome", s.outcome),
        ("files", str(s.documents)),
        ("pages ok", str(s.units_ok)),
        ("pages failed", str(s.units_failed)),
        ("pages skipped", str(s.units_skipped)),
        ("duplicates (no request)", str(s.units_duplicate)),
        ("done by earlier runs", str(s.units_already_done)),
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


# the columns of dataset_report's tables that hold numbers (right-aligned on a terminal)
NUMERIC = ("units", "ok", "failed", "requests", "credits", "usd")


def dataset_report(root: Any, run_id: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Totals from the Parquet output: by run, day, folder, status and document."""
    import math
    from pathlib import Path

    from ernie_batch import store

    cols = ["run_id", "date", "source_path", "status", "credits", "usd", "attempts",
            "page_last", "page"]
    table = store.read_columns(Path(root), "pages", cols)
    if table is None or table.num_rows == 0:
        return {}
    pages = table.to_pandas()
    if run_id is not None:
        pages = pages[pages["run_id"] == run_id]
    pages["date"] = pages["date"].astype(str)
    pages["folder"] = pages["source_path"].map(lambda p: str(Path(p).parent))
    pages["units_ok"] = pages["status"] == UnitStatus.OK

    def totals(by: str) -> list[dict[str, Any]]:
        rows = []
        for value, g in pages.groupby(by, sort=True):
            rows.append({
                by: value, "units": len(g), "ok": int(g["units_ok"].sum()),
                "failed": int(g["status"].isin(FAILED).sum()),
                "requests": int(g["attempts"].sum()),
                "credits": math.fsum(g["credits"]), "usd": math.fsum(g["usd"]),
            })
        return rows

    report = {name: totals(col) for name, col in
              (("runs", "run_id"), ("days", "date"), ("folders", "folder"),
               ("statuses", "status"), ("documents", "source_path"))}
    runs = store.read_table(Path(root), "runs")
    if runs is not None:
        outcome = dict(zip(runs["run_id"].to_pylist(), runs["outcome"].to_pylist(), strict=True))
        for row in report["runs"]:
            row["outcome"] = outcome.get(row["run_id"], "running or killed")
    return report
