"""`plan` and `report`: what a run would cost before it, what runs did after them. Neither sends a request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ernie_batch.cli.common import (
    BaseUrlOpt,
    ConfigOpt,
    JsonOpt,
    OutputOpt,
    SourcesArg,
    app,
    console,
    kv_table,
    load,
    out,
    overrides,
)


@app.command()
def plan(
    sources: SourcesArg = None,
    config: ConfigOpt = None,
    output: OutputOpt = None,
    base_url: BaseUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Count documents, pages and requests and estimate tokens, credits and time. Sends nothing."""
    import asyncio

    from ernie_batch.config import ConfigError, api_key
    from ernie_batch.plan import make_plan, plan_rows, read_balance

    cfg = load(config, {k: v for k, v in overrides(base_url, output).items() if v})
    if config is None:
        console.print(f"no --config: planning with the built-in defaults (sources "
                      f"{', '.join(map(str, cfg.sources.paths))}, output {cfg.output.path}, "
                      f"{cfg.api.base_url})", highlight=False, soft_wrap=True)
    result = make_plan(cfg, sources)
    try:
        result.balance = asyncio.run(read_balance(cfg, api_key(cfg)))
    except ConfigError:
        result.warnings.append(f"no API key in ${cfg.api.api_key_env}: balance not checked")
    if result.balance is not None and result.credits > result.balance:
        result.warnings.append(f"the estimate ({result.credits:,.0f} credits) exceeds the "
                               f"balance ({result.balance:,.0f})")
    if as_json:
        from dataclasses import asdict

        out.print_json(json.dumps({**asdict(result), "usd": result.usd}))
        return
    out.print(kv_table("ernie-batch plan (nothing sent)", plan_rows(result)))
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)


@app.command()
def report(
    config: ConfigOpt = None,
    output: OutputOpt = None,
    run_id: Annotated[str | None, typer.Option("--run", help="Only this run.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Totals by run, day, folder, status and document, read from the Parquet output."""
    from ernie_batch.report import NUMERIC, dataset_report

    cfg = load(config, {"output.path": str(output) if output else None})
    tables = dataset_report(Path(cfg.output.path), run_id)
    if as_json:
        out.print_json(json.dumps(tables, default=str))
        return
    if not tables:
        console.print(f"no pages in {cfg.output.path} yet")
        return
    for name, rows in tables.items():
        table = Table(title=name, title_justify="left")
        for col in rows[0]:
            table.add_column(col, justify="right" if col in NUMERIC else "left")
        for row in rows:
            table.add_row(*(f"{v:,.4f}" if isinstance(v, float) else str(v)
                            for v in row.values()))
        out.print(table)
