"""`documents`: how many documents the selected runs left complete, incomplete, conflicting; `--rebuild`."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from ernie_batch.cli.common import (
    ConfigOpt,
    JsonOpt,
    OutputOpt,
    RunIdOpt,
    SinceOpt,
    UntilOpt,
    WaitOpt,
    app,
    chosen_runs,
    console,
    emit_json,
    fail,
    kv_table,
    load,
    out,
    overrides,
    selection,
)
from ernie_batch.vocab import ExitCode

LISTED = 20  # incomplete or conflicting documents named on a terminal, at most


@app.command()
def documents(
    config: ConfigOpt = None,
    output: OutputOpt = None,
    run_ids: RunIdOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    rebuild: Annotated[bool, typer.Option(
        help="Write a new generation of the documents from pages with the config's merge "
             "rules (of the selected runs; none selected: every document). Sends nothing.")
    ] = False,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """Documents of the selected runs (default: the newest): complete, incomplete, conflicting."""
    from ernie_batch.answers.documents import DocumentCounts, documents_of_runs
    from ernie_batch.errors import LockedError, OutputError

    cfg = load(config, overrides(None, output))
    chosen = selection(run_ids, since, until)
    root = cfg.output.root()
    summary: dict[str, Any] = {}
    if rebuild:
        from ernie_batch.run.rebuild import rebuild_documents

        everything = not (chosen.run_ids or chosen.since or chosen.until)
        try:
            done = rebuild_documents(cfg, None if everything else chosen_runs(chosen, root), wait)
        except LockedError as exc:
            raise fail(str(exc), ExitCode.LOCKED) from None
        except OutputError as exc:
            raise fail(str(exc), ExitCode.USAGE) from None
        summary["rebuild"] = {"run_id": done.run_id, "documents": done.documents,
                              "changed": done.changed}
        ids = [done.run_id]
        what = "every document" if everything else f"the documents of {chosen.describe}"
    else:
        ids = chosen_runs(chosen, root)
        what = f"the documents of {chosen.describe}"
    table = documents_of_runs(root, ids)
    counts = DocumentCounts.of(table) if table is not None else DocumentCounts()
    summary = {"runs": ids, "documents": counts.documents, "complete": counts.complete,
               "incomplete": counts.incomplete, "conflicting": counts.conflicting, **summary}
    if as_json:
        emit_json(summary)
        return
    rows = [("runs", ", ".join(ids) or "none"), *((k, str(summary[k])) for k in
            ("documents", "complete", "incomplete", "conflicting"))]
    if rebuild:
        rows.insert(0, ("rebuilt", f"{what}: {done.documents} rows, {done.changed} changed, "
                                   "nothing sent"))
    out.print(kv_table(f"ernie-batch documents ({what})", rows))
    if table is not None:
        _list_unfinished(table)


def _list_unfinished(table: Any) -> None:
    """Name the incomplete and conflicting documents (the first LISTED of them)."""
    rows = [r for r in table.to_pylist() if not r["complete"] or r["conflicts_json"]]
    if not rows:
        return
    shown = Table(title="incomplete or conflicting", title_justify="left")
    shown.add_column("document", overflow="fold")
    shown.add_column("pages_missing", justify="right")
    shown.add_column("conflicts")
    for r in sorted(rows, key=lambda r: r["source_paths"][0] if r["source_paths"] else "")[:LISTED]:
        conflicts = ", ".join(json.loads(r["conflicts_json"])) if r["conflicts_json"] else ""
        shown.add_row(", ".join(r["source_paths"]), str(r["pages_missing"]), conflicts)
    out.print(shown)
    if len(rows) > LISTED:
        console.print(f"… and {len(rows) - LISTED} more")
