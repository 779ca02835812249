"""`compact`: maintenance that rewrites the output folder (small parts into few sorted files)."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ernie_batch.cli.common import (
    ConfigOpt,
    JsonOpt,
    OutputOpt,
    WaitOpt,
    app,
    console,
    emit_json,
    fail,
    load,
    out,
    overrides,
)
from ernie_batch.vocab import ExitCode

TableOpt = Annotated[str, typer.Option(
    "--table", help="pages, attempts, runs, documents, billing, or all.")]
BeforeOpt = Annotated[str | None, typer.Option(
    help="Only partitions dated before this UTC date (YYYY-MM-DD); default: all.")]


@app.command()
def compact(
    config: ConfigOpt = None,
    output: OutputOpt = None,
    before: BeforeOpt = None,
    table: TableOpt = "all",
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """Rewrite each date partition's small Parquet parts as a few large sorted files."""
    from ernie_batch import store
    from ernie_batch.answers import answer_fields
    from ernie_batch.compact import TABLE_ORDER, compact_output

    tables = list(TABLE_ORDER) if table == "all" else [table]
    if table != "all" and table not in TABLE_ORDER:
        raise fail(f"--table: unknown table {table!r} (known: {', '.join(TABLE_ORDER)}, all)",
                   ExitCode.USAGE)
    try:
        until = date.fromisoformat(before) if before else None
    except ValueError:
        raise fail(f"--before: not a date (YYYY-MM-DD): {before!r}", ExitCode.USAGE) from None
    cfg = load(config, overrides(None, output))
    root = Path(cfg.output.path)
    try:
        store.check_writable(root)
        summary = compact_output(root, tables, store.pages_schema(answer_fields(cfg.resolved.schema)),
                                 before=until, wait_s=wait)
    except store.OutputError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except store.LockedError as exc:
        raise fail(str(exc), ExitCode.LOCKED) from None
    if as_json:
        emit_json(summary.as_json())
        return
    grid = Table(title=f"ernie-batch compact {root} ({summary.seconds:g} s)", title_justify="left")
    for col in ("table", "partitions", "files", "rows", "MB"):
        grid.add_column(col, justify="left" if col == "table" else "right")
    for t in summary.tables:
        grid.add_row(t.table, str(t.partitions), f"{t.files_before:,} -> {t.files_after:,}",
                     f"{t.rows:,}", f"{t.bytes_before / 1e6:,.1f} -> {t.bytes_after / 1e6:,.1f}")
    out.print(grid)
    if summary.recovered_runs:
        console.print(f"folded first: the journals of {len(summary.recovered_runs)} killed run(s)")
    if summary.interrupted_finished:
        console.print(f"completed first: {summary.interrupted_finished} swap(s) of a compaction "
                      "cut short")
