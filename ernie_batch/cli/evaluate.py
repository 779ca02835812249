"""`eval`: prompt versions run on a labelled sample, scored side by side, and a gate before a backfill."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ernie_batch.cli.common import (
    BaseUrlOpt,
    GraceOpt,
    JsonOpt,
    OutputOpt,
    QuietOpt,
    RunFlags,
    WaitOpt,
    absolute_output,
    app,
    check_before_start,
    console,
    emit_json,
    fail,
    load,
    out,
    overrides,
)
from ernie_batch.vocab import ExitCode

ConfigsOpt = Annotated[list[Path], typer.Option(
    "--config", "-c", help="A prompt version's job config; repeat it, one per version.")]
LabelsOpt = Annotated[Path, typer.Option(
    help="The labels: JSON lines of path (relative to this file), page (null: the whole "
         "document) and fields.")]
GateOpt = Annotated[str | None, typer.Option(
    help="Exit 6 when this version (a config as given, or its file name) is more than "
         "--max-drop below the best other version.")]
MaxDropOpt = Annotated[float, typer.Option(
    help="The accuracy --gate allows below the best other version, absolute (0.02: two "
         "points).")]


@app.command(name="eval")
def eval_command(configs: ConfigsOpt, labels: LabelsOpt, base_url: BaseUrlOpt = None,
                 output: OutputOpt = None, gate: GateOpt = None, max_drop: MaxDropOpt = 0.0,
                 wait: WaitOpt = 0.0, grace: GraceOpt = 10.0, as_json: JsonOpt = False,
                 quiet: QuietOpt = False) -> None:
    """Run each config's prompt version on the labelled units, score the answers, compare.

    Every run goes into one output folder (--output, else the first config's): a unit a
    version answered before costs nothing again. Exit 0, or 6 when --gate fails."""
    flags = RunFlags(base_url=base_url, output=output, wait=wait, grace=grace,
                     as_json=as_json, quiet=quiet)
    evaluate(configs, [str(c) for c in configs], labels, flags, gate, max_drop)


def evaluate(configs: list[Path], names: list[str], labels_path: Path, flags: RunFlags,
             gate: str | None = None, max_drop: float = 0.0) -> None:
    """The eval command's body (also `demo --eval`'s): check, run, score, print, exit."""
    from ernie_batch.config import api_key
    from ernie_batch.errors import LabelsError
    from ernie_batch.evaluation import Version, eval_overrides, read_labels, run_eval

    if len(set(names)) != len(names):
        raise fail(f"--config {next(n for n in names if names.count(n) > 1)} is given twice",
                   ExitCode.USAGE)
    if max_drop < 0:
        raise fail("--max-drop: an accuracy drop, 0 or more (0.02: two points)", ExitCode.USAGE)
    gated = _gated_name(names, gate)
    try:
        labels = read_labels(labels_path)
    except LabelsError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    given = overrides(flags.base_url, flags.output)
    if flags.output is None:  # the first config's output holds every version's runs
        given["output.path"] = str(load(configs[0], given).output.path)
    given |= eval_overrides(labels.files)
    versions = []
    for config, name in zip(configs, names, strict=True):
        cfg = check_before_start(config, given, wait=flags.wait, sources=labels.files)
        versions.append(Version(name, cfg, api_key(cfg)))
    root = versions[0].cfg.output.root()
    from ernie_batch.cli.drive import drive, print_summary

    call = run_eval(versions, labels, root, gate=gated, max_drop=max_drop,
                    wait_lock_s=flags.wait, on_run=None if flags.quiet or flags.as_json
                    else _say_run)
    result = drive(call, flags, prefect=False,
                   before="between two runs: the runs that finished are recorded")
    if result.stopped is not None:
        print_summary(result.stopped, flags.as_json, flags.quiet, "ernie-batch eval (stopped)")
        console.print(f"[bold red]eval stopped:[/] {result.stopped.error or result.stopped.outcome}"
                      "; nothing was scored", highlight=False)
        raise typer.Exit(result.stopped.exit_code)
    if flags.as_json:
        emit_json(result.as_json())
    elif not flags.quiet:
        out.print(comparison(result))
        out.print(f"evals: {result.part}", highlight=False, soft_wrap=True)
    if result.gated is not None:
        console.print(f"[bold red]gate:[/] {result.gated} is more than {max_drop:g} below the "
                      f"best other version: exit {int(ExitCode.GATE)}", highlight=False)
        raise typer.Exit(ExitCode.GATE)
    raise typer.Exit(ExitCode.OK)


def demo_eval(output: str | None, latency: float, as_json: bool) -> None:
    """`demo --eval`: the simulator answers the samples from their labels' truth, each prompt
    version misreading fields at its own rates; the two versions compared as `eval` does."""
    from ernie_batch.config import load_config
    from ernie_batch.demo import CONFIG, CONFIG_V2, ERROR_RATES, EVAL_OUTPUT, LABELS, demo_home
    from ernie_batch.evaluation import read_labels
    from ernie_batch.evaluation.truth import truth_map
    from ernie_batch.sim import SimServer, SimSettings

    key = "sim-" + secrets.token_hex(16)
    target = absolute_output(output, EVAL_OUTPUT)
    with demo_home() as home:
        truth = truth_map(read_labels(home / LABELS), load_config(home / CONFIG))
        settings = SimSettings(api_key=key, latency_s=latency, scripted=truth,
                               error_rates=ERROR_RATES)
        with SimServer(settings) as sim:
            os.environ["AIMLAPI_API_KEY"] = key  # this process only: the demo needs no real key
            if not as_json:
                console.print(f"simulator on {sim.url}, answering from {home / LABELS}; "
                              f"output to {target}", highlight=False, soft_wrap=True)
            flags = RunFlags(base_url=sim.url, output=target, as_json=as_json)
            evaluate([home / CONFIG, home / CONFIG_V2], [CONFIG, CONFIG_V2], home / LABELS, flags)


def _gated_name(names: list[str], gate: str | None) -> str | None:
    """The version --gate names: a config as given, else the one with that file name."""
    if gate is None:
        return None
    if len(names) < 2:
        raise fail("--gate compares a version with others: give two configs or more",
                   ExitCode.USAGE)
    if gate in names:
        return gate
    matches = [n for n in names if Path(n).name == Path(gate).name]
    if len(matches) != 1:
        why = "matches none of" if not matches else "matches more than one of"
        raise fail(f"--gate {gate} {why} the configs given ({', '.join(names)})", ExitCode.USAGE)
    return matches[0]


def _say_run(version: Any, summary: Any) -> None:
    console.print(
        f"{version.name}: run {summary.run_id} {summary.outcome}: {summary.units_ok} ok, "
        f"{summary.units_failed} failed, {summary.units_already_done} answered before, "
        f"{summary.requests} requests, {summary.credits:,.0f} credits", highlight=False,
        soft_wrap=True)


def comparison(result: Any) -> Table:
    """The versions side by side: one column each, the best marked."""
    table = Table(title=f"ernie-batch eval {result.eval_id}", title_justify="left")
    table.add_column("")
    for s in result.scores:
        mark = " (best)" if s.config == result.best else ""
        table.add_column(s.config + mark + (" (gated)" if s.config == result.gated else ""),
                         justify="right")
    scores = result.scores
    rows: list[tuple[str, list[str]]] = [
        ("fingerprint", [s.fingerprint[:12] for s in scores]),
        ("prompt label", [s.prompt_label or "" for s in scores]),
        ("accuracy", [f"{_pct(s.accuracy)} ({s.correct}/{s.n})" for s in scores]),
    ]
    names = list(dict.fromkeys(n for s in scores for n in s.fields))
    for name in names:
        fields = [s.fields.get(name) for s in scores]
        rows.append((f"  {name}", [f"{_pct(f.accuracy)} (n {f.n})" if f else "" for f in fields]))
        if any(f and f.is_list for f in fields):
            rows.append(("    items P / R / F1", [
                f"{_pct(f.precision)} / {_pct(f.recall)} / {_pct(f.f1)}" if f else ""
                for f in fields]))
    for status in dict.fromkeys(st for s in scores for st in s.by_evidence):
        fields = [s.by_evidence.get(status) for s in scores]
        rows.append((f"  evidence {status}",
                     [f"{_pct(f.accuracy)} (n {f.n})" if f else "" for f in fields]))
    rows += [
        ("invalid answers", [_pct(s.invalid_rate) for s in scores]),
        ("credits / page", [_num(s.credits_per_page, ",.1f") for s in scores]),
        ("USD / page", [_num(s.usd_per_page, ".6f") for s in scores]),
        ("credits / correct field", [_num(s.cost_per_correct_field, ",.1f") for s in scores]),
        ("latency mean / p95", [f"{_num(s.latency_mean_s, '.2f')} / {_num(s.latency_p95_s, '.2f')} s"
                                for s in scores]),
        ("units / pages", [f"{s.units} / {s.pages}" for s in scores]),
        ("run", [s.run_id or "" for s in scores]),
    ]
    for label, cells in rows:
        table.add_row(label, *cells)
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)
