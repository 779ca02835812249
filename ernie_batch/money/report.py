"""Run summaries as tables and text (terminal, Prefect artifacts), and totals over runs (`report`)."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch import store
from ernie_batch.answers.documents import counts_by_run
from ernie_batch.location import Location, OutputRoot
from ernie_batch.money import billing
from ernie_batch.run.summary import RunSummary
from ernie_batch.store import fencing
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
        ("units_selected", str(s.units_selected)),
        ("documents_complete", f"{s.documents_complete} of {s.documents_built} built"),
        ("requests", f"{s.requests} ({s.rate_limited} rate_limited by the limit, "
                     f"{s.refused_sporadic} refused_sporadic by the vendor's capacity)"),
        ("credits", f"{s.credits:,.4f}"),
        ("USD", f"{s.usd:.6f}"),
        ("duration", f"{s.duration_s:.1f} s"),
        ("tables", s.output),
    ]
    if s.still_unreadable:
        rows.append(("unreadable", unreadable_line(s)))
    if s.review_html:
        rows.append(("review", s.review_html))
    if s.error:
        rows.append(("error", s.error))
    return rows


def unreadable_line(s: RunSummary) -> str:
    """`1 file still unreadable since run …: name` (--retry-failed tries them again)."""
    n = len(s.still_unreadable)
    names = ", ".join(Path(p).name for p in s.still_unreadable[:5]) + (" …" if n > 5 else "")
    return (f"{n} file{'s' if n != 1 else ''} still unreadable since run {s.unreadable_since}: "
            f"{names} (--retry-failed tries again)")


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
           "pages", "attempts", "fields_verified", "fields_checked", "share_verified",
           "rate_limited", "refused_sporadic")


def dataset_report(root: OutputRoot, run_ids: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
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
    cols = ["run_id", "date", "source_path", "status", "error", "credits", "usd", "attempts",
            "fingerprint", "fields_verified", "fields_checked", "evidence_json"]
    # the runs asked for are read, not every run's pages (files of other runs are skipped
    # by their statistics)
    where = None if run_ids is None else pc.field("run_id").isin(pa.array(run_ids, pa.string()))
    table = store.read_columns(root, "pages", cols, where)
    if table is None or table.num_rows == 0:
        return extra
    pages = table.to_pandas()
    pages["date"] = pages["date"].astype(str)
    pages["folder"] = pages["source_path"].map(lambda p: str(Location.parse(p).parent))
    report = {name: _totals(pages, col) for name, col in
              (("runs", "run_id"), ("days", "date"), ("folders", "folder"),
               ("statuses", "status"), ("files", "source_path"), ("prompts", "fingerprint"))}
    _add_reasons(pages, report["files"])
    for row, (_, g) in zip(report["runs"], pages.groupby("run_id", sort=True), strict=True):
        row["fields_verified"] = int(g["fields_verified"].fillna(0).sum())
        row["fields_checked"] = int(g["fields_checked"].fillna(0).sum())
        row["share_verified"] = (row["fields_verified"] / row["fields_checked"]
                                 if row["fields_checked"] else None)
    by_field = evidence_by_field(table["evidence_json"].to_pylist())
    if by_field:
        extra["evidence"] = by_field
    runs = store.read_table(root, "runs")
    if runs is not None:
        manifests = {r["run_id"]: r for r in runs.to_pylist()}
        for row in report["runs"]:
            manifest = manifests.get(row["run_id"], {})
            row["outcome"] = manifest.get("outcome", "running or killed")
            # which held the run back: the key's limit, or the vendor's capacity
            row["rate_limited"] = manifest.get("rate_limited")
            row["refused_sporadic"] = manifest.get("refused_sporadic")
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


def _shard_runs(root: OutputRoot, run_ids: list[str] | None) -> list[dict[str, Any]]:
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


def _add_vendor_credits(root: OutputRoot, runs: list[dict[str, Any]]) -> None:
    """Once a reconcile wrote `billing`: each run's recorded attempt credits beside the
    vendor's (from the current billing rows)."""
    vendor = billing.vendor_credits_by_run(root)
    if not vendor:
        return
    ids = pa.array(sorted({row["run_id"] for row in runs}), pa.string())
    attempts = store.read_columns(root, "attempts", ["run_id", "credits"],
                                  pc.field("run_id").isin(ids))  # the report's runs only
    recorded: dict[str, list[float]] = {}
    if attempts is not None:
        for run_id, credits in zip(attempts["run_id"].to_pylist(),
                                   attempts["credits"].to_pylist(), strict=True):
            recorded.setdefault(run_id, []).append(credits)
    for row in runs:
        row["recorded_credits"] = store.sum_exact(recorded.get(row["run_id"], []))
        row["vendor_credits"] = vendor.get(row["run_id"])


def orphaned(root: OutputRoot, run_ids: list[str] | None) -> list[dict[str, Any]]:
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


def _add_reasons(pages: Any, files: list[dict[str, Any]]) -> None:
    """Each file's reason when a unit of it was not answered: skipped (a file of no supported
    type: no document) or failed, the first such row's error."""
    unanswered = pages[pages["status"].isin([UnitStatus.SKIPPED, *FAILED])]
    reasons = unanswered.groupby("source_path")["error"].first().to_dict()
    for row in files:
        row["reason"] = reasons.get(row["source_path"])
def evidence_by_field(evidence: list[str | None]) -> list[dict[str, Any]]:
    """Per field (array items as `[]`: `line_items[].amount`): fields verified of those
    checked, and how many ended in each status."""
    from ernie_batch.answers.merged_evidence import page_entries
    from ernie_batch.vocab import EvidenceStatus

    tally: dict[str, Counter[str]] = {}
    for text in evidence:
        for path, entry in (page_entries(text) or {}).items():
            field = re.sub(r"\[\d+\]", "[]", path)
            tally.setdefault(field, Counter())[str(entry.get("status"))] += 1
    rows = []
    for field, n in sorted(tally.items()):
        checked = sum(v for k, v in n.items() if k != EvidenceStatus.NOT_CHECKED)
        rows.append({"field": field, "fields_verified": n[EvidenceStatus.VERIFIED],
                     "fields_checked": checked,
                     "share_verified": n[EvidenceStatus.VERIFIED] / checked if checked else None,
                     **{str(s): n[s] for s in EvidenceStatus if s != EvidenceStatus.VERIFIED}})
    return rows


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
