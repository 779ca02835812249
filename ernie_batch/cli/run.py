"""`run`, `backfill` and `demo`: one run of a flow, its progress on the terminal, its summary."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Any

import typer

from ernie_batch.cli.common import (
    ConfigOpt,
    JsonOpt,
    OutputOpt,
    RunFlags,
    SourcesArg,
    app,
    check_before_start,
    console,
    fail,
    given,
    prefect_defaults,
    with_run_flags,
)
from ernie_batch.cli.drive import drive, print_summary
from ernie_batch.vocab import ExitCode, RunOutcome


def run_flow(kind: str, config: Path | None, sources: list[Path] | None,
             overrides: dict[str, Any], flags: RunFlags) -> None:
    """Check what can be checked, run the flow with a progress display, print the summary, exit."""
    force, retry_failed, wait = flags.force, flags.retry_failed, flags.wait
    cfg = check_before_start(config, overrides, wait=wait, sources=sources)
    prefect_defaults()
    from ernie_batch.summary import RunSummary

    common = {"config_path": str(config) if config else None, "force": force,
              "retry_failed": retry_failed, "wait_lock_s": wait}
    folders = [str(s) for s in sources] if sources else None
    if cfg.scale.pool:
        from flows.coordinate import coordinate

        call = coordinate(overrides=overrides, kind=kind, pool=cfg.scale.pool,
                          shards=cfg.scale.shards, sources=folders, **common)
    elif kind == "backfill":
        from flows.backfill import backfill as backfill_flow

        call = backfill_flow(folders=folders, overrides=overrides, **common)
    else:
        from flows.ingest import ingest

        call = ingest(sources=folders, overrides=overrides, kind=kind, **common)
    summary = RunSummary.model_validate(drive(call, flags, prefect=True))
    print_summary(summary, flags.as_json, flags.quiet, f"ernie-batch {kind}")
    if summary.outcome == RunOutcome.FATAL_API_ERROR:
        console.print(f"[bold red]stopped:[/] {summary.error}", highlight=False)
    raise typer.Exit(summary.exit_code)


@app.command()
@with_run_flags
def run(sources: SourcesArg = None, config: ConfigOpt = None, *, flags: RunFlags) -> None:
    """Run the job once (the ingest flow): new and changed pages only."""
    run_flow("run", config, sources, flags.overrides(), flags)


@app.command()
@with_run_flags
def backfill(
    folders: Annotated[list[Path] | None, typer.Argument(
        help="Folders to backfill (default: the config's sources).")] = None,
    config: ConfigOpt = None,
    since: Annotated[str | None, typer.Option(
        help="Only files dated on or after this day (YYYY-MM-DD).")] = None,
    until: Annotated[str | None, typer.Option(
        help="Only files dated before this day (YYYY-MM-DD).")] = None,
    date_from: Annotated[str | None, typer.Option(
        help="Where a file's date comes from: mtime, or path (a YYYY-MM-DD in its path); "
             "default: the config's sources.date_from.")] = None,
    prompt_file: Annotated[Path | None, typer.Option(
        "--prompt", help="A new prompt template file (a new fingerprint: pages run again).")
    ] = None,
    *,
    flags: RunFlags,
) -> None:
    """Re-run a folder or a date range (the backfill flow), perhaps with a new prompt."""
    overrides = flags.overrides()
    overrides.update(given({"sources.since": since, "sources.until": until,
                            "sources.date_from": date_from}))
    if prompt_file is not None:
        try:
            prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:  # the flag's error, not the config's field
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise fail(f"--prompt {prompt_file}: cannot read: {reason}", ExitCode.USAGE) from None
        overrides["prompt.template_file"] = str(prompt_file.resolve())
        overrides["prompt.template"] = None  # clears an inline template of the config
    run_flow("backfill", config, folders, overrides, flags)


@app.command()
def demo(
    output: OutputOpt = None,
    latency: Annotated[float, typer.Option(help="Simulated API latency, seconds.")] = 0.2,
    as_json: JsonOpt = False,
    compare: Annotated[bool, typer.Option(
        "--eval", help="Compare the two sample prompt versions on the labelled samples "
                       "(into data/demo-eval) instead.")] = False,
) -> None:
    """Run the packaged sample documents through the built-in API simulator into data/demo-output."""
    if compare:
        from ernie_batch.cli.evaluate import demo_eval

        demo_eval(output, latency, as_json)  # exits
        return
    from ernie_batch.demo import CONFIG, OUTPUT, SAMPLES, demo_home
    from ernie_batch.sim import SimServer, SimSettings

    key = "sim-" + secrets.token_hex(16)
    target = (output or OUTPUT).absolute()  # under the folder the demo runs from
    with demo_home() as home, SimServer(SimSettings(api_key=key, latency_s=latency)) as sim:
        os.environ["AIMLAPI_API_KEY"] = key  # this process only: the demo needs no real key
        overrides = {
            "api.base_url": sim.url,
            "sources.paths": [str(home / SAMPLES)],
            "output.path": str(target),
        }
        if not as_json:
            console.print(f"simulator on {sim.url}; samples from {home / SAMPLES}; "
                          f"output to {target}", highlight=False, soft_wrap=True)
        run_flow("demo", home / CONFIG, None, overrides, RunFlags(as_json=as_json))
