"""`plan` and `report`: what a run would cost before it, what runs did after them. Neither sends a request."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ernie_batch.cli.common import (
    BaseUrlOpt,
    ConfigOpt,
    JsonOpt,
    OutputOpt,
    RunIdOpt,
    SettleOpt,
    SinceOpt,
    SourcesArg,
    UntilOpt,
    app,
    console,
    emit_json,
    fail,
    given,
    kv_table,
    load,
    out,
    overrides,
    probe,
    selection,
)
from ernie_batch.vocab import ExitCode


@app.command()
def plan(
    sources: SourcesArg = None,
    config: ConfigOpt = None,
    output: OutputOpt = None,
    base_url: BaseUrlOpt = None,
    settle: SettleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Count documents, pages and requests and estimate tokens, credits and time. Sends nothing."""

    from ernie_batch.config import ConfigError, api_key
    from ernie_batch.plan import make_plan, plan_rows

    cfg = load(config, {**overrides(base_url, output), **given({"sources.settle_seconds": settle})})
    if config is None:
        console.print(f"no --config: planning with the built-in defaults (sources "
                      f"{', '.join(map(str, cfg.sources.paths))}, output {cfg.output.path}, "
                      f"{cfg.api.base_url})", highlight=False, soft_wrap=True)
    try:
        result = make_plan(cfg, sources)
    except ConfigError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    try:
        result.balance = probe(cfg, api_key(cfg)).balance
    except ConfigError:
        result.warnings.append(f"no API key in ${cfg.api.api_key_env}: balance not checked")
    if result.balance is not None and result.credits > result.balance:
        result.warnings.append(f"the estimate ({result.credits:,.0f} credits) exceeds the "
                               f"balance ({result.balance:,.0f})")
    if as_json:
        from dataclasses import asdict

        emit_json({**asdict(result), "usd": result.usd})
        return
    out.print(kv_table("ernie-batch plan (nothing sent)", plan_rows(result)))
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)


@app.command()
def report(
    config: ConfigOpt = None,
    output: OutputOpt = None,
    run_ids: RunIdOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Totals of the selected runs (default: the newest) by run, day, folder, status, file, prompt."""
    from ernie_batch.report import NUMERIC, dataset_report

    cfg = load(config, overrides(None, output))
    chosen = selection(run_ids, since, until)
    root = Path(cfg.output.path)
    tables = dataset_report(root, chosen.resolve(root, include_rejected=True))  # orphaned ones
    if as_json:
        emit_json(tables)
        return
    if not tables:
        console.print(f"no pages of {chosen.describe} in {cfg.output.path}")
        return
    for name, rows in tables.items():
        table = Table(title=name, title_justify="left")
        for col in rows[0]:
            table.add_column(col, justify="right" if col in NUMERIC else "left")
        for row in rows:
            table.add_row(*(f"{v:,.4f}" if isinstance(v, float) else str(v)
                            for v in row.values()))
        out.print(table)
