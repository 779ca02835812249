"""`review`: the selected runs' pages as one self-contained HTML page (no server, no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ernie_batch.cli.common import (
    ConfigOpt,
    OutputOpt,
    RunIdOpt,
    SinceOpt,
    UntilOpt,
    app,
    chosen_runs,
    console,
    fail,
    load,
    out,
    overrides,
    selection,
)
from ernie_batch.vocab import ExitCode, UnitStatus

StatusOpt = Annotated[list[str] | None, typer.Option(
    "--status", help="Only pages with this status (repeatable): "
                     + ", ".join(s.value for s in UnitStatus) + ".")]
HtmlOpt = Annotated[Path, typer.Option(
    "--html", help="The file to write; past review.pages_per_file pages, more files beside it "
                   "(review-2.html, ...), linked from each other.")]


@app.command()
def review(
    config: ConfigOpt = None,
    output: OutputOpt = None,
    run_ids: RunIdOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    status: StatusOpt = None,
    html: HtmlOpt = Path("review.html"),
) -> None:
    """Each page of the selected runs (default: the newest) beside what was extracted from it."""
    from ernie_batch.errors import ConfigError
    from ernie_batch.review import build_review

    unknown = sorted(set(status or ()) - {s.value for s in UnitStatus})
    if unknown:
        raise fail(f"--status: unknown status {', '.join(unknown)} (one of "
                   + ", ".join(s.value for s in UnitStatus) + ")", ExitCode.USAGE)
    cfg = load(config, overrides(None, output))
    chosen = selection(run_ids, since, until)
    root = cfg.output.root()
    try:
        run_list = chosen_runs(chosen, root)
    except (ConfigError, ValueError) as exc:  # a --since or --until that is not a date
        raise fail(str(exc), ExitCode.USAGE) from None
    result = build_review(cfg, run_list, html, status, chosen.describe)
    if not result.files:
        console.print(f"no pages of {chosen.describe} in {root}", highlight=False)
        return
    size = sum(p.stat().st_size for p in result.files)
    out.print(f"{result.pages:,} pages of {chosen.describe}: {result.files[0]} "
              f"({len(result.files)} file{'s' if len(result.files) > 1 else ''}, "
              f"{size / 1e6:.1f} MB)", highlight=False, soft_wrap=True)
