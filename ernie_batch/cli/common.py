"""What every command shares: the consoles, the options, one-line errors, checks before Prefect starts."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ernie_batch.vocab import ExitCode

app = typer.Typer(
    help="Folders of PDFs and images -> a vision-language model -> validated rows in Parquet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: rich mode shows `<bool>` on every flag and eats "[schedule]" as markup
    rich_markup_mode=None,
)
console = Console(stderr=True)
out = Console()

def prefect_defaults() -> None:
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
GraceOpt = Annotated[float, typer.Option(
    help="After Ctrl-C or SIGTERM: seconds requests in flight may still take (a second Ctrl-C "
         "ends it).")]
PoolOpt = Annotated[str | None, typer.Option(
    help="Run as shard runs on this Prefect work pool (`ernie-batch deploy`); default: "
         "scale.pool.")]
ShardsOpt = Annotated[int | None, typer.Option(
    help="How many shard runs with --pool; default: scale.shards.")]
SettleOpt = Annotated[float | None, typer.Option(
    "--settle", help="Pass over files modified in the last SECONDS (still being copied); "
                     "default: sources.settle_seconds.")]
RunIdOpt = Annotated[list[str] | None, typer.Option(
    "--run", help="A run id (repeatable); a coordinator's id selects its shard runs too.")]
SinceOpt = Annotated[str | None, typer.Option(help="Runs started on or after this UTC date.")]
UntilOpt = Annotated[str | None, typer.Option(help="Runs started before this UTC date.")]


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The flags the user gave (None: not given), by dotted config name: only these override."""
    return {k: v for k, v in values.items() if v is not None}


def overrides(base_url: str | None, output: Path | None, concurrency: int | None = None,
              rpm: float | None = None) -> dict[str, Any]:
    """The common flags that override config fields, by dotted name, those given only."""
    return given({
        "api.base_url": base_url,
        "output.path": str(output) if output else None,
        "limits.concurrency": concurrency,
        "limits.rpm": rpm,
    })


@dataclass(frozen=True)
class RunFlags:
    """The options every run command shares, declared once (typer has no option groups)."""

    base_url: BaseUrlOpt = None
    output: OutputOpt = None
    concurrency: ConcurrencyOpt = None
    rpm: RpmOpt = None
    force: ForceOpt = False
    retry_failed: RetryFailedOpt = False
    wait: WaitOpt = 0.0
    grace: GraceOpt = 10.0
    settle: SettleOpt = None
    pool: PoolOpt = None
    shards: ShardsOpt = None
    as_json: JsonOpt = False
    quiet: QuietOpt = False

    def overrides(self) -> dict[str, Any]:
        return {**overrides(self.base_url, self.output, self.concurrency, self.rpm),
                **given({"sources.settle_seconds": self.settle, "scale.pool": self.pool,
                         "scale.shards": self.shards})}


def with_flags(cls: type) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Add the options of the dataclass `cls` to a command; it receives them as one `flags`
    argument (an instance of `cls`).

    Typer reads a command's options from its signature, so the wrapper's signature is the
    command's own parameters followed by the shared ones.
    """

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        hints = {f.name: typing.get_type_hints(cls, include_extras=True)[f.name]
                 for f in fields(cls)}
        shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                    annotation=hints[f.name]) for f in fields(cls)]
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.name != "flags"]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> None:
            flags = cls(**{name: kwargs.pop(name) for name in hints})
            return command(**kwargs, flags=flags)

        wrapper.__signature__ = inspect.Signature([*own, *shared])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {**{k: v for k, v in command.__annotations__.items()
                                      if k != "flags"}, **hints}
        return wrapper

    return decorate


with_run_flags = with_flags(RunFlags)  # the options every run command shares


def selection(run_ids: list[str] | None, since: str | None, until: str | None) -> Any:
    """The run selection of `--run` / `--since` / `--until` (none: the newest run); a bound
    that is not a date exits 2 here, for every command that selects runs."""
    from ernie_batch.discover import parse_bound
    from ernie_batch.selection import RunSelection

    try:
        parse_bound(since, "--since")
        parse_bound(until, "--until")
    except ValueError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    return RunSelection(tuple(run_ids or ()), since, until)


@dataclass(frozen=True)
class SelectionFlags:
    """The options of commands that look at runs (CONTRACT "Run selection"), and `--json`."""

    run_ids: RunIdOpt = None
    since: SinceOpt = None
    until: UntilOpt = None
    as_json: JsonOpt = False

    def selection(self) -> Any:
        return selection(self.run_ids, self.since, self.until)


def load(config: Path | None, flags: dict[str, Any]) -> Any:
    """The job config, or exit 2 with its one-line error."""
    from ernie_batch.config import ConfigError, load_config

    try:
        return load_config(config, flags)
    except ConfigError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None


def check_before_start(config: Path | None, flags: dict[str, Any], need_key: bool = True,
                       wait: float | None = None, sources: list[Path] | None = None) -> Any:
    """Everything that can be checked before Prefect starts (seconds): config, key, output.

    With `wait` given (a run), the sources must exist, the output folder be writable and
    not locked by a live run (unless the caller is willing to wait for it), and the endpoint
    answer one balance call with the key (an unreachable host or a rejected key: exit 3).
    """
    from ernie_batch import store
    from ernie_batch.client import check_base_url
    from ernie_batch.config import ConfigError, api_key

    cfg = load(config, flags)
    try:
        check_base_url(cfg.api.base_url, cfg.api.allow_insecure_http)
        key = api_key(cfg) if need_key else None
    except ConfigError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    if wait is None:
        return cfg
    try:
        store.check_writable(Path(cfg.output.path))
        store.wait_until_unlocked(Path(cfg.output.path), wait)  # Prefect starts once it is free
    except store.OutputError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except store.LockedError as exc:
        raise fail(str(exc), ExitCode.LOCKED) from None
    missing = [p for p in (sources or cfg.sources.paths) if not Path(p).expanduser().exists()]
    if missing:
        raise fail(f"{'sources' if sources else 'sources.paths'}: {missing[0]} does not exist",
                   ExitCode.USAGE)
    if cfg.scale.pool:
        check_pool(cfg)
    if key is not None:
        probe(cfg, key)
    return cfg


def check_pool(cfg: Any) -> None:
    """A run on a pool needs a Prefect server (the ephemeral one has no workers) and a limit."""
    from ernie_batch.prefect_server import configured_api_url
    from ernie_batch.scale.coordinator import pool_limit_problem

    if not configured_api_url():
        raise fail(f"--pool {cfg.scale.pool}: shard runs need a Prefect server with a work pool; "
                   "set PREFECT_API_URL (`ernie-batch server start` prints it)", ExitCode.USAGE)
    problem = pool_limit_problem(cfg)
    if problem:
        raise fail(problem, ExitCode.USAGE)


def probe(cfg: Any, key: Any) -> Any:
    """One balance call (`client.Probe`); an unreachable host or a rejected key exits 3 here."""
    import asyncio

    from ernie_batch.client import ApiClient

    async def ask() -> Any:
        client = ApiClient(cfg.api.base_url, key, timeout_s=15,
                           connect_timeout_s=cfg.api.connect_timeout_s,
                           allow_insecure_http=cfg.api.allow_insecure_http)
        try:
            return await client.probe()
        finally:
            await client.aclose()

    result = asyncio.run(ask())
    if result.problem:
        raise fail(result.problem, ExitCode.FATAL)
    return result


def emit_json(value: Any) -> None:
    """`--json`: one object on one line, the last on stdout (CONTRACT "JSON lines")."""
    print(json.dumps(value, default=str, separators=(",", ":")), flush=True)


def kv_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    """A two-column table of names and values (summaries, plans)."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    return table


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    yield
