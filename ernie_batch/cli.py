"""`ernie-batch`: the command line (typer + rich).

Prefect, pandas and the engine are imported inside the commands: `import prefect` alone
costs seconds, and `ernie-batch --help` should answer at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Folders of PDFs and images -> a vision-language model -> validated rows in Parquet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXIT_USAGE, EXIT_FATAL, EXIT_LOCKED = 2, 3, 5


def _prefect_defaults() -> None:
    """Settings a fresh machine needs before Prefect is imported (the user's own values win)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def fail(message: str, code: int) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Job config (TOML).")]
SourcesArg = Annotated[list[Path] | None, typer.Argument(
    help="Folders or files to read instead of the config's sources.")]
BaseUrlOpt = Annotated[str | None, typer.Option(
    help="API base URL, e.g. https://api.aimlapi.com/v1 or a local OpenAI-compatible server.")]
OutputOpt = Annotated[Path | None, typer.Option(help="Output folder for the Parquet dataset.")]
ConcurrencyOpt = Annotated[int | None, typer.Option(help="Requests in flight at most.")]
RpmOpt = Annotated[float | None, typer.Option(help="Requests per minute at most (0 = adapt).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
ForceOpt = Annotated[bool, typer.Option(help="Re-send pages already answered.")]
RetryFailedOpt = Annotated[bool, typer.Option(
    help="Also retry inputs recorded as input_error or skipped.")]
WaitOpt = Annotated[float, typer.Option(
    help="Seconds to wait for another run's lock on the output folder.")]


def _overrides(base_url: str | None, output: Path | None, concurrency: int | None,
               rpm: float | None) -> dict[str, Any]:
    return {
        "api.base_url": base_url,
        "output.path": str(output) if output else None,
        "limits.concurrency": concurrency,
        "limits.rpm": rpm,
    }


def _check_config(config: Path | None, overrides: dict[str, Any], need_key: bool = True,
                  wait: float | None = None) -> None:
    """Everything that can be checked before Prefect starts (seconds): config, key, output.

    With `wait` given, the output folder must be writable and not locked by a live run
    (unless the caller is willing to wait for it).
    """
    from ernie_batch import store
    from ernie_batch.client import check_base_url
    from ernie_batch.config import ConfigError, api_key, load_config

    try:
        cfg = load_config(config, overrides)
        check_base_url(cfg.api.base_url, cfg.api.allow_insecure_http)
        if need_key:
            api_key(cfg)
    except ConfigError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    if wait is None:
        return
    try:
        store.check_writable(Path(cfg.output.path))
    except store.OutputError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    owner = store.live_lock_owner(Path(cfg.output.path))
    deadline = time.monotonic() + wait
    while owner and time.monotonic() < deadline:  # queue here: Prefect starts once it is free
        time.sleep(0.5)
        owner = store.live_lock_owner(Path(cfg.output.path))
    if owner:
        raise fail(f"output folder {cfg.output.path} is locked by run {owner.get('run_id')} "
                   f"(pid {owner.get('pid')}); use --wait to queue behind it", EXIT_LOCKED)


def _run_flow(kind: str, config: Path | None, sources: list[Path] | None,
              overrides: dict[str, Any], force: bool, retry_failed: bool, wait: float,
              as_json: bool, quiet: bool) -> None:
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _check_config(config, overrides, wait=wait)
    _prefect_defaults()
    import asyncio

    from ernie_batch.config import ConfigError
    from ernie_batch.engine import RunSummary
    from ernie_batch.store import LockedError, OutputError

    common = {"config_path": str(config) if config else None, "force": force,
              "retry_failed": retry_failed, "wait_lock_s": wait}
    folders = [str(s) for s in sources] if sources else None
    if kind == "backfill":
        from flows.backfill import backfill

        call = backfill(folders=folders, overrides=overrides, **common)
    else:
        from flows.ingest import ingest

        call = ingest(sources=folders, overrides=overrides, kind=kind, **common)
    from ernie_batch.engine import PROGRESS_OBSERVER
    from ernie_batch.progress import ProgressView

    view = ProgressView(console)
    token = PROGRESS_OBSERVER.set(None if (quiet or as_json) else view)
    try:
        with view if not (quiet or as_json) else _nothing():
            result = asyncio.run(call)
    except LockedError as exc:
        raise fail(str(exc), EXIT_LOCKED) from None
    except (ConfigError, OutputError) as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    finally:
        PROGRESS_OBSERVER.reset(token)
    summary = RunSummary.model_validate(result)
    _print_summary(summary, as_json, quiet)
    if summary.outcome == "fatal_api_error":
        console.print(f"[bold red]stopped:[/] {summary.error}", highlight=False)
    raise typer.Exit(summary.exit_code)


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def _print_summary(summary: Any, as_json: bool, quiet: bool) -> None:
    from ernie_batch.report import summary_rows

    if as_json:
        out.print_json(json.dumps(summary.model_dump(mode="json")))
        return
    if quiet:
        return
    table = Table(title="ernie-batch run", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in summary_rows(summary):
        table.add_row(k, v)
    out.print(table)
    for msg, n in summary.top_errors:
        out.print(f"  {n} × {msg}", highlight=False)


@app.command()
def run(
    sources: SourcesArg = None,
    config: ConfigOpt = None,
    base_url: BaseUrlOpt = None,
    output: OutputOpt = None,
    concurrency: ConcurrencyOpt = None,
    rpm: RpmOpt = None,
    force: ForceOpt = False,
    retry_failed: RetryFailedOpt = False,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the job once (the ingest flow): new and changed pages only."""
    _run_flow("run", config, sources, _overrides(base_url, output, concurrency, rpm), force,
              retry_failed, wait, as_json, quiet)


@app.command()
def backfill(
    folders: Annotated[list[Path] | None, typer.Argument(
        help="Folders to backfill (default: the config's sources).")] = None,
    config: ConfigOpt = None,
    since: Annotated[str | None, typer.Option(
        help="Only files dated on or after this day (YYYY-MM-DD).")] = None,
    until: Annotated[str | None, typer.Option(
        help="Only files dated before this day (YYYY-MM-DD).")] = None,
    date_from: Annotated[str, typer.Option(
        help="Where a file's date comes from: mtime, or path (a YYYY-MM-DD in its path).")
    ] = "mtime",
    prompt_file: Annotated[Path | None, typer.Option(
        "--prompt", help="A new prompt template file (a new fingerprint: pages run again).")
    ] = None,
    base_url: BaseUrlOpt = None,
    output: OutputOpt = None,
    concurrency: ConcurrencyOpt = None,
    rpm: RpmOpt = None,
    force: ForceOpt = False,
    retry_failed: RetryFailedOpt = False,
    wait: WaitOpt = 0.0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Re-run a folder or a date range (the backfill flow), perhaps with a new prompt."""
    overrides = _overrides(base_url, output, concurrency, rpm)
    overrides.update({"sources.since": since, "sources.until": until,
                      "sources.date_from": date_from})
    if prompt_file is not None:
        overrides["prompt.template_file"] = str(prompt_file.resolve())
        overrides["prompt.template"] = None
    _run_flow("backfill", config, folders, overrides, force, retry_failed, wait, as_json, quiet)


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

    from ernie_batch.config import ConfigError, api_key, load_config
    from ernie_batch.plan import make_plan, read_balance

    overrides = {k: v for k, v in _overrides(base_url, output, None, None).items() if v}
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
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
    table = Table(title="ernie-batch plan (nothing sent)", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    minutes = result.minutes_at_rate_limit
    for k, v in (
        ("documents", f"{result.documents} ({result.documents_unreadable} unreadable)"),
        ("pages", str(result.pages)),
        ("requests to send", f"{result.requests} ({result.requests_done_before} done before)"),
        ("prompt tokens (est.)", f"{result.prompt_tokens:,}"),
        ("completion tokens (est.)", f"{result.completion_tokens:,}"),
        ("credits (est.)", f"{result.credits:,.0f}  ({result.price_source})"),
        ("USD (est.)", f"{result.usd:.4f}"),
        ("time at the rate limit", _duration(minutes)),
        ("balance", "unknown" if result.balance is None else f"{result.balance:,.0f} credits"),
    ):
        table.add_row(k, v)
    out.print(table)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)


def _duration(minutes: float | None) -> str:
    if minutes is None:
        return "no limit set"
    return f"{minutes * 60:.0f} s" if minutes < 2 else f"{minutes:.1f} min"


@app.command()
def report(
    config: ConfigOpt = None,
    output: OutputOpt = None,
    run_id: Annotated[str | None, typer.Option("--run", help="Only this run.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Totals by run, day, folder, status and document, read from the Parquet output."""
    from ernie_batch.config import ConfigError, load_config
    from ernie_batch.report import dataset_report

    try:
        cfg = load_config(config, {"output.path": str(output) if output else None})
    except ConfigError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    tables = dataset_report(cfg.output.path, run_id)
    if as_json:
        out.print_json(json.dumps(tables, default=str))
        return
    if not tables:
        console.print(f"no pages in {cfg.output.path} yet")
        return
    for name, rows in tables.items():
        table = Table(title=name, title_justify="left")
        for col in rows[0]:
            numeric = col in ("units", "ok", "failed", "requests", "credits", "usd")
            table.add_column(col, justify="right" if numeric else "left")
        for row in rows:
            table.add_row(*(f"{v:,.4f}" if isinstance(v, float) else str(v)
                            for v in row.values()))
        out.print(table)


@app.command()
def demo(
    output: OutputOpt = None,
    latency: Annotated[float, typer.Option(help="Simulated API latency, seconds.")] = 0.2,
    as_json: JsonOpt = False,
) -> None:
    """Run the sample documents in data/samples through the built-in API simulator."""
    from ernie_batch.simulator import SimServer, SimSettings

    key = "sim-" + secrets.token_hex(16)
    with SimServer(SimSettings(api_key=key, latency_s=latency)) as sim:
        os.environ["AIMLAPI_API_KEY"] = key  # this process only: the demo needs no real key
        overrides = {
            "api.base_url": sim.url,
            "sources.paths": [str(PROJECT_ROOT / "data" / "samples")],
            "output.path": str(output or PROJECT_ROOT / "data" / "output"),
        }
        if not as_json:
            console.print(f"simulator on {sim.url}; samples from {PROJECT_ROOT / 'data/samples'}")
        _run_flow("demo", PROJECT_ROOT / "configs" / "demo.toml", None, overrides, False,
                  False, 0.0, as_json, False)


@app.command()
def sim(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8765,
    latency: Annotated[float, typer.Option(help="Seconds before each answer.")] = 0.5,
    api_key: Annotated[str | None, typer.Option(
        help="Key the simulator accepts (default: $AIMLAPI_API_KEY, else a new one).")] = None,
    rpm: Annotated[float, typer.Option(help="Requests per minute enforced (0 = none).")] = 0.0,
) -> None:
    """Serve the AI/ML API simulator on loopback (for trying configs without a real key)."""
    from ernie_batch.simulator import SimSettings, serve

    key = api_key or os.environ.get("AIMLAPI_API_KEY") or "sim-" + secrets.token_hex(16)
    if not (api_key or os.environ.get("AIMLAPI_API_KEY")):
        console.print(f"accepting the key [bold]{key}[/] (export AIMLAPI_API_KEY={key})")
    console.print(f"AI/ML API simulator on http://127.0.0.1:{port}/v1  (Ctrl-C stops it)")
    serve(SimSettings(api_key=key, latency_s=latency, rpm=rpm), port=port)


@app.command()
def bench(
    scenarios: Annotated[list[str] | None, typer.Argument(
        help="Scenarios to run (default: all). Known: see the README's benchmark section.")
    ] = None,
    scale: Annotated[float, typer.Option(
        help="Shrink (<1) or grow (>1) each scenario's workload.")] = 1.0,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON line per scenario.")] = False,
) -> None:
    """Measure speed and memory as ratios against a baseline measured in the same run."""
    from ernie_batch.bench import SCENARIOS, scenario

    names = scenarios or list(SCENARIOS)
    for name in names:
        try:
            run_scenario = scenario(name)
        except KeyError as exc:
            raise fail(str(exc.args[0]), EXIT_USAGE) from None
        if not as_json:
            console.print(f"running {name} …")
        result = run_scenario(scale)
        if as_json:
            print(json.dumps(result), flush=True)
            continue
        verdict = "meets" if result["ratio"] >= result["goal"] else "MISSES"
        out.print(f"[bold]{name}[/]: ratio {result['ratio']:.3f} ({verdict} goal "
                  f"{result['goal']})", highlight=False)
        for k, v in result.items():
            if k not in ("scenario", "ratio", "goal"):
                out.print(f"  {k}: {v}", highlight=False)


@app.command()
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="Job config (TOML) with a "
                                         "[schedule] cron or interval_minutes.")],
) -> None:
    """Serve the ingest flow on the config's schedule (starts a local Prefect server if needed)."""
    _check_config(config, {}, need_key=False)  # a Secret block is read by each run
    _prefect_defaults()
    from flows.deploy import serve_schedule

    raise typer.Exit(serve_schedule(config))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
