"""`plan` and `report`: what a run would cost before it, what runs did after them. Neither sends a request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from ernie_batch.cli.common import (
    BaseUrlOpt,
    ConfigOpt,
    DateFromOpt,
    FilesSinceOpt,
    FilesUntilOpt,
    ForceOpt,
    JsonOpt,
    OutputOpt,
    PromptOpt,
    RetryFailedOpt,
    RunFlags,
    RunIdOpt,
    SettleOpt,
    SinceOpt,
    SourcesArg,
    UntilOpt,
    app,
    cell,
    chosen_runs,
    console,
    emit_json,
    fail,
    given,
    kv_table,
    load,
    out,
    overrides,
    pick_overrides,
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
    since: FilesSinceOpt = None,
    until: FilesUntilOpt = None,
    date_from: DateFromOpt = None,
    prompt_file: PromptOpt = None,
    force: ForceOpt = False,
    retry_failed: RetryFailedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """What `run`/`backfill` with these flags would send: documents, requests, tokens, credits,
    time. Sends nothing (`run --plan` and `backfill --plan` say the same)."""
    flags = {**overrides(base_url, output), **given({"sources.settle_seconds": settle}),
             **pick_overrides(since, until, date_from, prompt_file)}
    show_plan(config, sources, flags,
              RunFlags(force=force, retry_failed=retry_failed, as_json=as_json))


def show_plan(config: Path | None, sources: list[str] | None, flags: dict[str, Any],
              run_flags: RunFlags) -> None:
    """Print the plan of a run with this config, these overrides and these run flags."""
    from ernie_batch.config import ConfigError, api_key
    from ernie_batch.money.plan import make_plan, plan_rows

    cfg = load(config, flags)
    if config is None:
        console.print(f"no --config: planning with the built-in defaults (sources "
                      f"{', '.join(map(str, cfg.sources.paths))}, output {cfg.output.path}, "
                      f"{cfg.api.base_url})", highlight=False, soft_wrap=True)
    try:
        result = make_plan(cfg, sources, force=run_flags.force,
                           retry_failed=run_flags.retry_failed)
    except (ConfigError, ValueError) as exc:  # a source that is not there, a bad date
        raise fail(str(exc), ExitCode.USAGE) from None
    try:
        result.balance = probe(cfg, api_key(cfg)).balance
    except ConfigError:
        result.warnings.append(f"no API key in ${cfg.api.api_key_env}: balance not checked")
    if result.balance is not None and result.credits > result.balance:
        result.warnings.append(f"the estimate ({result.credits:,.0f} credits) exceeds the "
                               f"balance ({result.balance:,.0f})")
    if run_flags.as_json:
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
    from ernie_batch.money.report import NUMERIC, dataset_report

    cfg = load(config, overrides(None, output))
    chosen = selection(run_ids, since, until)
    root = cfg.output.root()
    tables = dataset_report(root, chosen_runs(chosen, root, include_rejected=True))  # orphaned ones
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
            table.add_row(*(cell(v) for v in row.values()))
        out.print(table)
