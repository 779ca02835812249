"""`serve`, `sim` and `bench`: the long-running commands (a schedule, the simulator, benchmarks)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Annotated

import typer

from ernie_batch.bench import SCENARIOS  # names only: the scenarios import on use
from ernie_batch.cli.common import app, check_before_start, console, fail, out, prefect_defaults
from ernie_batch.vocab import ExitCode


@app.command()
def sim(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8765,
    latency: Annotated[float, typer.Option(help="Seconds before each answer.")] = 0.5,
    api_key: Annotated[str | None, typer.Option(
        help="Key the simulator accepts (default: $AIMLAPI_API_KEY, else a new one).")] = None,
    rpm: Annotated[float, typer.Option(help="Requests per minute enforced (0 = none).")] = 0.0,
) -> None:
    """Serve the AI/ML API simulator on loopback (for trying configs without a real key)."""
    from ernie_batch.sim import SimSettings, serve

    key = api_key or os.environ.get("AIMLAPI_API_KEY") or "sim-" + secrets.token_hex(16)
    if not (api_key or os.environ.get("AIMLAPI_API_KEY")):
        console.print(f"accepting the key [bold]{key}[/] (export AIMLAPI_API_KEY={key})")
    console.print(f"AI/ML API simulator on http://127.0.0.1:{port}/v1  (Ctrl-C stops it)")
    serve(SimSettings(api_key=key, latency_s=latency, rpm=rpm), port=port)


@app.command()
def bench(
    scenarios: Annotated[list[str] | None, typer.Argument(
        help=f"Scenarios to run (default: all): {', '.join(SCENARIOS)}.")] = None,
    scale: Annotated[float, typer.Option(
        help="Shrink (<1) or grow (>1) each scenario's workload.")] = 1.0,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON line per scenario.")] = False,
    output: Annotated[str | None, typer.Option(
        help="Where `history` writes its outputs: s3://bucket/prefix (the AWS environment "
             "reaches it) or a folder; a fresh prefix under it, deleted at the end.")] = None,
) -> None:
    """Measure speed and memory as ratios against a baseline measured in the same run."""
    from ernie_batch.bench import OUTPUT_SCENARIOS, scenario

    names = scenarios or list(SCENARIOS)
    if output is not None and set(names) - set(OUTPUT_SCENARIOS):
        raise fail(f"--output: only for {', '.join(OUTPUT_SCENARIOS)} "
                   f"(not {', '.join(sorted(set(names) - set(OUTPUT_SCENARIOS)))})",
                   ExitCode.USAGE)
    for name in names:
        try:
            run_scenario = scenario(name)
        except KeyError as exc:
            raise fail(str(exc.args[0]), ExitCode.USAGE) from None
        if not as_json:
            console.print(f"running {name} …")
        result = run_scenario(scale, output) if output is not None else run_scenario(scale)
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
    check_before_start(config, {}, need_key=False)  # a Secret block is read by each run
    prefect_defaults()
    from flows.deploy import serve_schedule

    raise typer.Exit(serve_schedule(config))
