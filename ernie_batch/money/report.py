"""Run summaries as tables and text (terminal, Prefect artifacts), and totals over runs (`report`)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch import billing, store
from ernie_batch.documents import counts_by_run
from ernie_batch.store import fencing
from ernie_batch.summary import RunSummary
from ernie_batch.vocab import FAILED, UnitStatus


def summary_rows(s: RunSummary) -> list[tuple[str, str]]:
    """The summary as (name, value) lines, the counts under their one name (CONTRACT.md)."""
    rows = [("run", s.run_id), ("outcome", s.outcome), ("files", str(s.documents))]
    if s.files_passed_over:
        passed = ", ".join(f"{k}: {v}" for k, v in sorted(s.files_passed_over.items()))
        rows.append(("files_passed_over", passed))
    if s.still_growing:
        rows.append(("still growing", f"{len(s.still_growing)} file(s) modified in the last "
                     f"{s.settle_s:g} s passed over; --settle 0 includes them: "
                     + ", ".join(s.still_growing[:5]) + (" …" if len(s.still_growing) > 5 else "")))
    rows += [
        ("units_ok", str(s.units_ok)),
        ("units_failed", str(s.units_failed)),
        ("units_skipped", str(s.units_skipped)),
        ("units_duplicate", str(s.units_duplicate)),
        ("units_already_done", str(s.units_already_done)),
        ("units_not_sent", str(s.units_not_sent)),
        ("documents_complete", f"{s.documents_complete} of {s.documents_built} built"),
        ("requests", f"{s.requests} ({s.rate_limited} rate-limited)"),
        ("credits", f"{s.credits:,.4f}"),
        ("USD", f"{s.usd:.6f}"),
        ("duration", f"{s.duration_s:.1f} s"),
        ("parquet", s.output),
    ]
    if s.review_html:
        rows.append(("review", s.review_html))
    if s.error:
        rows.append(("error", s.error))
    return rows


def finished_line(s: RunSummary) -> str:
    """One line for a finished scheduled run (what `serve` prints)."""
    return (f"{s.kind} run {s.run_id}: units_ok {s.units_ok}, units_failed {s.units_failed}, "
            f"credits {s.credits:,.4f}, outcome {s.outcome}")


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
NUMERIC = ("units", "units_ok", "units_failed", "requests", "credits", "usd", "documents",
           "complete", "incomplete", "conflicting", "recorded_credits", "vendor_credits",
           "pages", "attempts")


def dataset_report(root: Path, run_ids: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Totals of the selected runs' pages (all runs when None): by run, day, folder, status,
    file and prompt version (fingerprint, named by its template, schema and label); and the
    documents each run built (complete, incomplete, conflicting). Rows of shard runs their
    coordinator rejected count in none of these: the selected ones are `orphaned`."""
    documents = counts_by_run(root, run_ids)
    lost = orphaned(root, run_ids)
    extra = ({"documents": documents} if documents else {}) | ({"orphaned": lost} if lost else {})
    shards = _shard_runs(root, run_ids)
    if shards:
        extra["shards"] = shards
    cols = ["run_id", "date", "source_path", "status", "credits", "usd", "attempts",
            "fingerprint"]
    table = store.read_columns(root, "pages", cols)
    if table is None or table.num_rows == 0:
        return extra
    if run_ids is not None:
        table = table.filter(pc.is_in(table["run_id"], pa.array(run_ids, pa.string())))
        if table.num_rows == 0:
            return extra
    pages = table.to_pandas()
    pages["date"] = pages["date"].astype(str)
    pages["folder"] = pages["source_path"].map(lambda p: str(Path(p).parent))
    report = {name: _totals(pages, col) for name, col in
              (("runs", "run_id"), ("days", "date"), ("folders", "folder"),
               ("statuses", "status"), ("files", "source_path"), ("prompts", "fingerprint"))}
    runs = store.read_table(root, "runs")
    if runs is not None:
        manifests = {r["run_id"]: r for r in runs.to_pylist()}
        for row in report["runs"]:
            row["outcome"] = manifests.get(row["run_id"], {}).get("outcome", "running or killed")
        for row in report["prompts"]:
            named = next((m for m in sorted(manifests.values(), key=lambda m: m["started_at"],
                                            reverse=True)
                          if m.get("fingerprint") == row["fingerprint"]), {})
            row["fingerprint"] = row["fingerprint"][:12]
            row["label"] = named.get("prompt_label")
            row["template"] = named.get("template_path")
            row["schema"] = named.get("schema_path")
    _add_vendor_credits(root, report["runs"])
    return report | extra


def _shard_runs(root: Path, run_ids: list[str] | None) -> list[dict[str, Any]]:
    """The selected coordinators' shard runs: where each ran, how it ended, whether it counts."""
    runs = store.read_table(root, "runs", include_rejected=True)
    if runs is None or "parent_run_id" not in runs.column_names:
        return []
    rows = runs.to_pylist()
    coordinators = {r["run_id"]: r for r in rows if r["kind"] == "coordinator"
                    and (run_ids is None or r["run_id"] in run_ids)}
    out = []
    for r in sorted(rows, key=lambda r: (r["parent_run_id"] or "", r["shard"] or 0)):
        parent = coordinators.get(r["parent_run_id"])
        if parent is None:
            continue
        out.append({"coordinator": parent["run_id"], "shard": r["shard"], "run_id": r["run_id"],
                    "hostname": r["hostname"], "pid": r["pid"], "outcome": r["outcome"],
                    "units_ok": r["units_ok"], "units_failed": r["units_failed"],
                    "credits": r["credits"],
                    "accepted": r["run_id"] in (parent["accepted_runs"] or [])})
    return out


def _add_vendor_credits(root: Path, runs: list[dict[str, Any]]) -> None:
    """Once a reconcile wrote `billing`: each run's recorded attempt credits beside the vendor's."""
    vendor = billing.vendor_credits_by_run(root)
    if not vendor:
        return
    attempts = store.read_columns(root, "attempts", ["run_id", "credits"])
    recorded: dict[str, list[float]] = {}
    if attempts is not None:
        for run_id, credits in zip(attempts["run_id"].to_pylist(),
                                   attempts["credits"].to_pylist(), strict=True):
            recorded.setdefault(run_id, []).append(credits)
    for row in runs:
        row["recorded_credits"] = store.sum_exact(recorded.get(row["run_id"], []))
        row["vendor_credits"] = vendor.get(row["run_id"])


def orphaned(root: Path, run_ids: list[str] | None) -> list[dict[str, Any]]:
    """The rejected shard runs among `run_ids` (all: None), each with its coordinator, the rows
    it left in each table (compaction drops those of `pages` and `documents`) and the credits
    its attempts recorded: requests the vendor billed, counted in no other total."""
    ids = (fencing.rejected_runs(root) if run_ids is None
           else fencing.rejected_among(root, run_ids))
    if len(ids) == 0:
        return []
    where = pc.field("run_id").isin(ids)

    def rows(table: str, cols: list[str]) -> list[dict[str, Any]]:
        found = store.read_columns(root, table, ["run_id", *cols], where, include_rejected=True)
        return found.to_pylist() if found is not None else []

    attempts = rows("attempts", ["credits", "usd"])
    counted = {t: Counter(r["run_id"] for r in rows(t, [])) for t in ("pages", "documents")}
    out = []
    for run in sorted(rows("runs", ["parent_run_id", "shard", "outcome"]),
                      key=lambda r: r["run_id"]):
        rid = run["run_id"]
        mine = [a for a in attempts if a["run_id"] == rid]
        out.append({"run_id": rid, "coordinator": run["parent_run_id"], "shard": run["shard"],
                    "outcome": run["outcome"], "pages": counted["pages"][rid],
                    "attempts": len(mine), "documents": counted["documents"][rid],
                    "credits": store.sum_exact(a["credits"] for a in mine),
                    "usd": store.sum_exact(a["usd"] for a in mine)})
    return out


def _totals(pages: Any, by: str) -> list[dict[str, Any]]:
    rows = []
    for value, g in pages.groupby(by, sort=True):
        rows.append({
            by: value, "units": len(g), "units_ok": int((g["status"] == UnitStatus.OK).sum()),
            "units_failed": int(g["status"].isin(FAILED).sum()),
            "requests": int(g["attempts"].sum()),
            "credits": math.fsum(g["credits"]), "usd": math.fsum(g["usd"]),
        })
    return rows
