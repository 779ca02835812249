"""`run`, `backfill` and `demo`: one run of a flow, its progress on the terminal, its summary."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Any

import typer

from ernie_batch.cli.common import (
    ConfigOpt,
    DateFromOpt,
    FilesSinceOpt,
    FilesUntilOpt,
    JsonOpt,
    OutputOpt,
    Probing,
    PromptOpt,
    RunFlags,
    SourcesArg,
    absolute_output,
    app,
    check_before_start,
    console,
    emit_json,
    pick_overrides,
    prefect_defaults,
    with_run_flags,
)
from ernie_batch.cli.drive import drive, print_summary
from ernie_batch.vocab import ExitCode, RunOutcome

NOTHING_TO_DO = "nothing_to_do"  # `--json`'s outcome of a run that found no document


def run_flow(kind: str, config: Path | None, sources: list[str] | None,
             overrides: dict[str, Any], flags: RunFlags) -> None:
    """Check what can be checked, run the flow with a progress display, print the summary, exit.

    Discovery comes before Prefect (a run with nothing to do ends here, in a second), and so
    does the start of the preparation workers; the flow's run takes what was found.
    """
    if flags.plan:  # the dry run: what this command would send and cost
        from ernie_batch.cli.info import show_plan

        return show_plan(config, sources, overrides, flags)
    force, retry_failed, wait = flags.force, flags.retry_failed, flags.wait
    cfg = check_before_start(config, overrides, wait=wait, sources=sources, probe_later=True)
    probing = Probing(cfg)  # the endpoint answers while we find documents and import Prefect
    folders = [str(s) for s in sources] if sources else None
    found = None
    if not cfg.scale.pool:  # a coordinator discovers for its shards itself
        found = find_documents(kind, cfg, sources, flags, probing)
        from ernie_batch.intake.prepare import start_workers_early

        start_workers_early(cfg.prepare, len(found[0]))
    prefect_defaults()
    from ernie_batch.prefect_server import use_home

    use_home(cfg.server)
    from ernie_batch.run.engine import FOUND
    from ernie_batch.run.summary import RunSummary

    common = {"config_path": str(config) if config else None, "force": force,
              "retry_failed": retry_failed, "wait_lock_s": wait}
    if cfg.scale.pool:
        from flows.coordinate import coordinated as flow

        args = {"kind": kind, "pool": cfg.scale.pool, "shards": cfg.scale.shards,
                "sources": folders}
    elif kind == "backfill":
        from flows.backfill import backfill as flow

        args = {"folders": folders}
    else:
        from flows.ingest import ingest as flow

        args = {"sources": folders, "kind": kind}
    probing.result()  # the flow's coroutine after it: never one left unawaited by an exit
    call = flow(overrides=overrides, **args, **common)
    token = FOUND.set((folders, *found) if found is not None else None)
    try:
        summary = RunSummary.model_validate(drive(call, flags, prefect=cfg))
    finally:
        FOUND.reset(token)
    print_summary(summary, flags.as_json, flags.quiet, f"ernie-batch {kind}")
    if summary.outcome == RunOutcome.FATAL_API_ERROR:
        console.print(f"[bold red]stopped:[/] {summary.error}", highlight=False)
    raise typer.Exit(summary.exit_code)


def find_documents(kind: str, cfg: Any, sources: list[str] | None, flags: RunFlags,
                   probing: Probing) -> tuple[list[Any], Any]:
    """The run's documents, found before Prefect starts; none at all: say so and exit 0 (no
    flow run, no `runs` row: a run that did nothing is no "newest run"), once the endpoint
    took the key (a rejected key still exits 3)."""
    import functools

    from ernie_batch import store
    from ernie_batch.intake.discover import discover
    from ernie_batch.run.summary import RunSummary

    opts = cfg.sources.model_copy(update={"paths": list(sources)}) if sources else cfg.sources
    # objects on object storage whose (URL, ETag) the output knows are not read again
    docs, stats = discover(opts, known=functools.partial(store.known_objects, cfg.output.root()))
    if docs:
        return docs, stats
    probing.result()
    where = ", ".join(str(p) for p in opts.paths)
    passed = sum(stats.skipped.values())
    why = (f" ({passed} file{'s' if passed != 1 else ''} passed over: "
           + ", ".join(f"{reason} {n}" for reason, n in sorted(stats.skipped.items())) + ")"
           if passed else "")
    if not flags.quiet:
        console.print(f"nothing to do: no documents under {where}{why}", highlight=False,
                      soft_wrap=True)
    if flags.as_json:
        emit_json(RunSummary(
            run_id="", kind=kind, outcome=NOTHING_TO_DO, exit_code=ExitCode.OK,
            output=str(cfg.output.path), files_passed_over=dict(stats.skipped),
            still_growing=[str(p) for p in stats.still_growing],
            settle_s=cfg.sources.settle_seconds).model_dump(mode="json"))
    raise typer.Exit(ExitCode.OK)


@app.command()
@with_run_flags
def run(sources: SourcesArg = None, config: ConfigOpt = None, *, flags: RunFlags) -> None:
    """Run the job once (the ingest flow): new and changed pages only."""
    run_flow("run", config, sources, flags.overrides(), flags)


@app.command()
@with_run_flags
def backfill(
    folders: Annotated[list[str] | None, typer.Argument(
        help="Folders or s3://bucket/prefix to backfill (default: the config's sources).")
    ] = None,
    config: ConfigOpt = None,
    since: FilesSinceOpt = None,
    until: FilesUntilOpt = None,
    date_from: DateFromOpt = None,
    prompt_file: PromptOpt = None,
    *,
    flags: RunFlags,
) -> None:
    """Re-run a folder or a date range (the backfill flow), perhaps with a new prompt."""
    overrides = {**flags.overrides(), **pick_overrides(since, until, date_from, prompt_file)}
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
    target = absolute_output(output, OUTPUT)  # under the folder the demo runs from
    with demo_home() as home, SimServer(SimSettings(api_key=key, latency_s=latency)) as sim:
        os.environ["AIMLAPI_API_KEY"] = key  # this process only: the demo needs no real key
        overrides = {
            "api.base_url": sim.url,
            "sources.paths": [str(home / SAMPLES)],
            "output.path": target,
        }
        if not as_json:
            console.print(f"simulator on {sim.url}; samples from {home / SAMPLES}; "
                          f"output to {target}", highlight=False, soft_wrap=True)
        run_flow("demo", home / CONFIG, None, overrides, RunFlags(as_json=as_json))
