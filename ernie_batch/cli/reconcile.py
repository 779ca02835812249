"""`reconcile`: the selected runs' recorded credits against the vendor's usage logs; the `billing` table."""

from __future__ import annotations

import typer
from rich.table import Table

from ernie_batch.cli.common import (
    BaseUrlOpt,
    ConfigOpt,
    OutputOpt,
    SelectionFlags,
    app,
    check_before_start,
    console,
    emit_json,
    fail,
    kv_table,
    out,
    overrides,
    say_why,
    with_flags,
)
from ernie_batch.vocab import ExitCode

FIGURES = ("vendor_requests", "vendor_credits", "recorded_credits", "unrecorded_credits",
           "unbilled_recorded", "mismatched", "pending", "foreign_requests", "foreign_credits")


@app.command()
@with_flags(SelectionFlags)
def reconcile(config: ConfigOpt = None, base_url: BaseUrlOpt = None, output: OutputOpt = None, *,
              flags: SelectionFlags) -> None:
    """Match the selected runs' requests (default: the newest run with pages) with the
    vendor's usage logs, add what is new (or attributed anew) to the billing table, and say
    whether every credit is accounted for.

    Exit 0 when exact, 1 when not (or something is still pending), 2 when the endpoint has
    no usage logs, 3 when they cannot be read (key, network)."""
    import asyncio

    from ernie_batch import store
    from ernie_batch.config import ConfigError, api_key
    from ernie_batch.errors import NoUsageLogs, UsageLogsError
    from ernie_batch.money.reconcile import reconcile_runs

    cfg = check_before_start(config, overrides(base_url, output))  # config, base URL, key
    key = api_key(cfg)
    chosen = flags.selection()
    try:
        result = asyncio.run(reconcile_runs(cfg, key, chosen))
    except (NoUsageLogs, ConfigError) as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except UsageLogsError as exc:
        raise fail(str(exc), ExitCode.FATAL) from None
    except store.LockedError as exc:
        raise fail(str(exc), ExitCode.LOCKED) from None
    say_why(result.why)
    figures = result.figures
    code = ExitCode.OK if figures.exact else ExitCode.FAILED
    if flags.as_json:
        emit_json(figures.as_json())
        raise typer.Exit(code)
    if not result.run_ids:
        console.print(f"no runs of {chosen.describe} in {cfg.output.path}")
    window = (f"{result.start:%Y-%m-%d %H:%M:%S} to {result.end:%Y-%m-%d %H:%M:%S} UTC"
              if result.start and result.end else "none yet (every request is within the lag)")
    rows = [("runs", ", ".join(result.run_ids) or "none"), ("logs window", window),
            *((name, _show(getattr(figures, name))) for name in FIGURES),
            *_others(result.others),
            ("billing rows written", f"{result.added} to {cfg.output.root().table_uri('billing')}"),
            ("exact", "yes" if figures.exact else "NO")]
    out.print(kv_table("ernie-batch reconcile", rows))
    if len(result.per_run) > 1:
        table = Table(title="per run", title_justify="left")
        for col in ("run", "vendor_requests", "vendor_credits", "recorded_credits",
                    "unrecorded_credits", "pending", "exact"):
            table.add_column(col, justify="left" if col == "run" else "right")
        for run_id, f in result.per_run.items():
            table.add_row(run_id, str(f.vendor_requests), _show(f.vendor_credits),
                          _show(f.recorded_credits), _show(f.unrecorded_credits), str(f.pending),
                          "yes" if f.exact else "NO")
        out.print(table)
    raise typer.Exit(code)


def _others(others: dict) -> list[tuple[str, str]]:
    """Rows of this output's runs outside the selection: attributed to them, judged when
    they are selected."""
    if not others:
        return []
    requests = sum(f.vendor_requests for f in others.values())
    credits = sum(f.vendor_credits for f in others.values())
    return [("other runs in the window", f"{requests:,} requests, {credits:,} credits of "
             f"{len(others)} run(s) not selected: " + ", ".join(sorted(others)))]


def _show(value: float | int) -> str:
    return f"{value:,.4f}" if isinstance(value, float) else f"{value:,}"
