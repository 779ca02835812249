"""How every run command runs: a progress display, graceful signals, Prefect's server, errors as exits."""

from __future__ import annotations

import contextlib
from collections.abc import Coroutine, Iterator
from typing import Any

import typer

from ernie_batch.cli.common import console, emit_json, fail, kv_table, nothing, out
from ernie_batch.vocab import ExitCode


def drive(call: Coroutine[Any, Any, Any], flags: Any, *, prefect: Any = None,
          before: str = "before the run started: nothing was sent") -> Any:
    """Await `call` as every run command does: a progress display (unless `--quiet` or
    `--json`), Ctrl-C and SIGTERM stopping its runs gracefully (`flags.grace`), Prefect's
    server when `prefect` is the job's config (its `[server]` options), and the errors that end a command
    as their exit codes.

    A signal that comes while no run is working aborts, with `before` said of it."""
    import asyncio

    from ernie_batch.errors import ConfigError, LockedError, OutputError, ServerStartError
    from ernie_batch.run.engine import PROGRESS_OBSERVER
    from ernie_batch.run.interrupt import GRACEFUL, Graceful
    from ernie_batch.run.progress import ProgressView

    shown = not (flags.quiet or flags.as_json)
    view = ProgressView(console)
    graceful = Graceful(flags.grace)
    from ernie_batch.scale.coordinator import STATUS_OBSERVER

    tokens = (PROGRESS_OBSERVER.set(view if shown else None), GRACEFUL.set(graceful),
              STATUS_OBSERVER.set(view.note if shown else None))
    try:
        with graceful.handling(), (view if shown else nothing()), \
                (prefect_api(prefect, view if shown else None, flags.quiet)
                 if prefect not in (None, False) else nothing()):
            return asyncio.run(call)
    except KeyboardInterrupt:
        console.print(f"interrupted by {graceful.signal_name} {before}", highlight=False)
        raise typer.Exit(graceful.exit_code) from None
    except LockedError as exc:
        raise fail(str(exc), ExitCode.LOCKED) from None
    except (ConfigError, OutputError) as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except ServerStartError as exc:
        raise fail(str(exc), ExitCode.SERVER) from None
    finally:
        call.close()  # interrupted before `asyncio.run` took it: no "never awaited" warning
        PROGRESS_OBSERVER.reset(tokens[0])
        GRACEFUL.reset(tokens[1])
        STATUS_OBSERVER.reset(tokens[2])


@contextlib.contextmanager
def prefect_api(cfg: Any, view: Any, quiet: bool) -> Iterator[None]:
    """The Prefect server the flow talks to: the configured one, else the home's
    (`ernie_batch.server`: the one running, or a new background one, or the command's own).

    Never Prefect's ephemeral one: it shares our process group, so a terminal's Ctrl-C would
    kill it while the run still needs it (see `ernie_batch.prefect_server`).
    """
    from ernie_batch.prefect_server import configured_api_url, home_server_api

    if configured_api_url():
        yield
        return

    def say(message: str) -> None:
        if view is not None:
            view.status(message)
        elif not quiet:
            console.print(message, highlight=False, soft_wrap=True)

    def note(message: str) -> None:  # it outlives the command: said where it stays visible
        if not quiet:
            console.print(message, highlight=False, soft_wrap=True)

    with home_server_api(cfg.server, secrets=(cfg.api.api_key_env,), say=say, note=note):
        if view is not None:
            view.status("Prefect is up: taking the output folder, finding documents …")
        yield


def print_summary(summary: Any, as_json: bool, quiet: bool, title: str) -> None:
    from ernie_batch.money.report import summary_rows

    if as_json:
        emit_json(summary.model_dump(mode="json"))
        return
    if quiet:
        return
    out.print(kv_table(title, summary_rows(summary)))
    for msg, n in summary.top_errors:
        out.print(f"  {n} × {msg}", highlight=False)
