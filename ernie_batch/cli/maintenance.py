"""`compact` and `migrate`: maintenance of the output's tables (small files merged and old
ones vacuumed; an earlier release's layout converted to Delta tables)."""

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
    """Optimize each date partition's small files into a few large ones, then vacuum."""
    from ernie_batch import store
    from ernie_batch.answers.judge import answer_fields
    from ernie_batch.run.compact import COMPACTED_TABLES, compact_output

    tables = list(COMPACTED_TABLES) if table == "all" else [table]
    if table != "all" and table not in COMPACTED_TABLES:
        raise fail(f"--table: unknown table {table!r} (known: {', '.join(COMPACTED_TABLES)}, all)",
                   ExitCode.USAGE)
    try:
        until = date.fromisoformat(before) if before else None
    except ValueError:
        raise fail(f"--before: not a date (YYYY-MM-DD): {before!r}", ExitCode.USAGE) from None
    cfg = load(config, overrides(None, output))
    root = cfg.output.root()
    try:
        store.check_writable(root)
        summary = compact_output(root, tables, store.pages_schema(answer_fields(cfg.resolved.schema)),
                                 before=until, wait_s=wait, options=cfg.compact)
    except store.OutputError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except store.LockedError as exc:
        raise fail(str(exc), ExitCode.LOCKED) from None
    if as_json:
        emit_json(summary.as_json())
        return
    grid = Table(title=f"ernie-batch compact {root} ({summary.seconds:g} s)", title_justify="left")
    for col in ("table", "partitions", "files", "rows", "MB", "vacuumed"):
        grid.add_column(col, justify="left" if col == "table" else "right")
    for t in summary.tables:
        grid.add_row(t.table, str(t.partitions), f"{t.files_before:,} -> {t.files_after:,}",
                     f"{t.rows:,}", f"{t.bytes_before / 1e6:,.1f} -> {t.bytes_after / 1e6:,.1f}",
                     f"{t.files_vacuumed:,}")
    out.print(grid)
    if summary.recovered_runs:
        console.print(f"folded first: the journals of {len(summary.recovered_runs)} killed run(s)")


@app.command()
def migrate(
    output: Annotated[Path, typer.Argument(help="The output folder to convert in place.")],
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """Convert an output written by the release before Delta tables into Delta tables, in place
    (safe to kill and run again); exit 0 when converted or already Delta."""
    from ernie_batch import store
    from ernie_batch.store.migrate import migrate_output

    if not output.is_dir():
        raise fail(f"output folder {output} does not exist", ExitCode.USAGE)
    run_lock = store.OutputLock(output, store.new_run_id())  # no run, compaction or rebuild
    others = [store.data_lock(output, exclusive=True), store.compact_lock(output)]
    try:
        run_lock.acquire(wait)
        for lock in others:
            if not lock.acquire(wait):
                raise store.LockedError(f"output folder {output} is in use ({lock.path.name} "
                                        "is held); use --wait to queue behind it")
        done = migrate_output(output)
    except store.LockedError as exc:
        raise fail(str(exc), ExitCode.LOCKED) from None
    finally:
        for lock in reversed(others):
            lock.release()
        run_lock.release()
    if as_json:
        emit_json(done.as_json())
        return
    if not done.converted:
        out.print(f"{output}: every table is a Delta table already; nothing to convert")
        return
    grid = Table(title=f"ernie-batch migrate {output}", title_justify="left")
    for col in ("table", "parts", "rows", "commits"):
        grid.add_column(col, justify="left" if col == "table" else "right")
    for t in done.tables:
        grid.add_row(t.table, f"{t.parts:,}", f"{t.rows:,}", str(t.commits))
    out.print(grid)
