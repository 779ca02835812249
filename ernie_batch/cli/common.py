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

if typing.TYPE_CHECKING:
    from ernie_batch.location import OutputRoot

app = typer.Typer(
    help="Folders of PDFs and images -> a vision-language model -> validated rows in Delta tables.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: rich mode shows `<bool>` on every flag and eats "[schedule]" as markup
    rich_markup_mode=None,
)
class Stdout(Console):
    """stdout: rich tables on a terminal; anywhere else (`| cat`, cron mail, CI logs) every
    table as plain aligned text at its full width and every line whole: nothing is cut to
    the 80 columns a pipe reports."""

    def print(self, *objects: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if self.is_terminal:
            super().print(*objects, **kwargs)
            return
        for item in objects:
            if isinstance(item, Table):
                self.file.write(self.plain_table(item) + "\n")
                self.file.flush()
            else:
                super().print(item, **{**kwargs, "soft_wrap": True})

    def plain_table(self, table: Table) -> str:
        """The table's title, header and rows, columns two spaces apart, numbers right-aligned."""
        def text(cell: Any) -> str:
            return self.render_str(cell).plain if isinstance(cell, str) else str(
                getattr(cell, "plain", cell))

        columns = [[text(c) for c in col.cells] for col in table.columns]
        headers = [text(col.header) for col in table.columns] if table.show_header else None
        widths = [max([len(v) for v in cells] + [len(headers[i]) if headers else 0])
                  for i, cells in enumerate(columns)]
        right = [col.justify == "right" for col in table.columns]

        def line(values: list[str]) -> str:
            return "  ".join(v.rjust(w) if r else v.ljust(w)
                             for v, w, r in zip(values, widths, right, strict=True)).rstrip()

        lines = [text(table.title)] if table.title else []
        if headers:
            lines.append(line(headers))
        lines += [line(list(row)) for row in zip(*columns, strict=True)]
        return "\n".join(lines)


console = Console(stderr=True)
out = Stdout()


def cell(value: Any) -> str:
    """A table cell: a dash for nothing (never `None`), floats grouped to 4 places."""
    if value is None:
        return "-"
    return f"{value:,.4f}" if isinstance(value, float) else str(value)

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
# strings, never Path: pathlib turns s3://bucket/inbox into s3:/bucket/inbox
SourcesArg = Annotated[list[str] | None, typer.Argument(
    help="Folders, files or s3://bucket/prefix to read instead of the config's sources.")]
BaseUrlOpt = Annotated[str | None, typer.Option(
    help="API base URL, e.g. https://api.aimlapi.com/v1 or a local OpenAI-compatible server.")]
OutputOpt = Annotated[str | None, typer.Option(
    help="Output folder (or s3://bucket/prefix) of the Delta tables.")]
ConcurrencyOpt = Annotated[int | None, typer.Option(help="Requests in flight at most.")]
RpmOpt = Annotated[float | None, typer.Option(help="Requests per minute at most (0 = adapt).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
ForceOpt = Annotated[bool, typer.Option(help="Re-send pages already answered.")]
RetryFailedOpt = Annotated[bool, typer.Option(
    help="Also retry inputs recorded as input_error or skipped, and files given up on as "
         "unreadable.")]
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
PlanOpt = Annotated[bool, typer.Option(
    "--plan", help="Only say what this would send and cost (as `ernie-batch plan`); send nothing.")]
# backfill's (and plan's) file selection and prompt: `pick_overrides` turns them into config
FilesSinceOpt = Annotated[str | None, typer.Option(
    "--since", help="Only files dated on or after this day (YYYY-MM-DD).")]
FilesUntilOpt = Annotated[str | None, typer.Option(
    "--until", help="Only files dated before this day (YYYY-MM-DD).")]
DateFromOpt = Annotated[str | None, typer.Option(
    help="Where a file's date comes from: mtime, or path (a YYYY-MM-DD in its path); "
         "default: the config's sources.date_from.")]
PromptOpt = Annotated[Path | None, typer.Option(
    "--prompt", help="A new prompt template file (a new fingerprint: pages run again).")]


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The flags the user gave (None: not given), by dotted config name: only these override."""
    return {k: v for k, v in values.items() if v is not None}


def pick_overrides(since: str | None, until: str | None, date_from: str | None,
                   prompt_file: Path | None) -> dict[str, Any]:
    """The config fields `--since`, `--until`, `--date-from` and `--prompt` override; an
    unreadable `--prompt` exits 2 naming the flag, not the config field."""
    values = given({"sources.since": since, "sources.until": until,
                    "sources.date_from": date_from})
    if prompt_file is not None:
        try:
            prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise fail(f"--prompt {prompt_file}: cannot read: {reason}", ExitCode.USAGE) from None
        values["prompt.template_file"] = str(prompt_file.resolve())
        values["prompt.template"] = None  # clears an inline template of the config
    return values


def overrides(base_url: str | None, output: str | Path | None, concurrency: int | None = None,
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
    plan: PlanOpt = False

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
    """The run selection of `--run` / `--since` / `--until` (none: the newest run with pages); a bound
    that is not a date exits 2 here, for every command that selects runs."""
    from ernie_batch.intake.discover import parse_bound
    from ernie_batch.run.selection import RunSelection

    try:
        parse_bound(since, "--since")
        parse_bound(until, "--until")
    except ValueError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    return RunSelection(tuple(run_ids or ()), since, until)


def chosen_runs(chosen: Any, root: OutputRoot, *, include_rejected: bool = False) -> list[str]:
    """The run ids of a selection; says on stderr, in one line, which runs and why."""
    picked = chosen.choose(root, include_rejected=include_rejected)
    say_why(picked.why)
    return picked.run_ids


def say_why(why: str | None) -> None:
    if why:
        console.print(why, highlight=False, soft_wrap=True, markup=False)


@dataclass(frozen=True)
class SelectionFlags:
    """The options of commands that look at runs (CONTRACT "Run selection"), and `--json`."""

    run_ids: RunIdOpt = None
    since: SinceOpt = None
    until: UntilOpt = None
    as_json: JsonOpt = False

    def selection(self) -> Any:
        return selection(self.run_ids, self.since, self.until)


def absolute_output(output: str | None, default: Path) -> str:
    """`--output` (else `default`) with a local folder made absolute; a URL as it is."""
    from ernie_batch.location import Location

    try:
        return str(Location.parse(output if output else default).absolute())
    except ValueError as exc:
        raise fail(f"--output: {exc}", ExitCode.USAGE) from None


def load(config: Path | None, flags: dict[str, Any]) -> Any:
    """The job config, or exit 2 with its one-line error (also when its output folder holds
    an earlier release's tables: the line names `migrate`)."""
    from ernie_batch.config import ConfigError, load_config
    from ernie_batch.errors import UnconvertedOutputError
    from ernie_batch.store.layout import check_layout

    try:
        cfg = load_config(config, flags)
        check_layout(cfg.output.path)
    except (ConfigError, UnconvertedOutputError) as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    return cfg


def check_before_start(config: Path | None, flags: dict[str, Any], need_key: bool = True,
                       wait: float | None = None,
                       sources: list[str] | list[Path] | None = None,
                       probe_later: bool = False) -> Any:
    """Everything that can be checked before Prefect starts (seconds): config, key, output.

    With `wait` given (a run), the sources must exist, the output folder be writable and
    not locked by a live run (unless the caller is willing to wait for it), and the endpoint
    answer one balance call with the key (an unreachable host or a rejected key: exit 3),
    unless the caller makes that call itself (`probe_later`: `Probing`, beside other work).
    """
    from ernie_batch import store
    from ernie_batch.api.client import check_base_url
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
        store.check_writable(cfg.output.root())
        store.wait_until_unlocked(cfg.output.root(), wait)  # Prefect starts once it is free
    except store.OutputError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except store.LockedError as exc:
        raise fail(str(exc), ExitCode.LOCKED) from None
    from ernie_batch.intake.objects import source_problem

    if cfg.scale.pool:  # before the sources: a local one is refused, found or not
        check_pool(cfg, [str(s) for s in sources] if sources else None)
    for source in sources or cfg.sources.paths:
        try:
            problem = source_problem(source, cfg.sources.storage_options)
        except ConfigError as exc:
            problem = str(exc)
        if problem:
            raise fail(f"{'sources' if sources else 'sources.paths'}: {problem}", ExitCode.USAGE)
    if key is not None and not probe_later:
        probe(cfg, key)
    return cfg


def check_pool(cfg: Any, sources: list[str] | None = None) -> None:
    """A run on a pool needs a Prefect server (the ephemeral one has no workers), sources its
    workers can read (on object storage) and a limit (`pool_problem`)."""
    from ernie_batch.prefect_server import configured_api_url
    from ernie_batch.scale.coordinator import pool_problem

    if not configured_api_url():
        raise fail(f"--pool {cfg.scale.pool}: shard runs need a Prefect server with a work pool; "
                   "set PREFECT_API_URL (`ernie-batch server start` prints it)", ExitCode.USAGE)
    problem = pool_problem(cfg, sources)
    if problem:
        raise fail(problem, ExitCode.USAGE)


def probe(cfg: Any, key: Any, client: Any = None) -> Any:
    """One balance call (`api.client.Probe`); an unreachable host or a rejected key exits 3 here."""
    import asyncio

    result = asyncio.run(_ask_balance(client or probe_client(cfg, key)))
    if result.problem:
        raise fail(result.problem, ExitCode.FATAL)
    return result


def probe_client(cfg: Any, key: Any) -> Any:
    from ernie_batch.api.client import ApiClient

    return ApiClient(cfg.api.base_url, key, timeout_s=15,
                     connect_timeout_s=cfg.api.connect_timeout_s,
                     allow_insecure_http=cfg.api.allow_insecure_http)


async def _ask_balance(client: Any) -> Any:
    try:
        return await client.probe()
    finally:
        await client.aclose()


# what a balance call imports on first use, imported before it moves to a thread: a thread
# that imports while the main thread imports too can meet it in a cycle (a _DeadlockError)
_PROBE_MODULES = ("anyio._backends._asyncio", "anyio.streams.tls", "anyio.to_thread", "sniffio",
                  "queue")


class Probing:
    """`probe` in a thread, so the caller's own work (finding documents, importing Prefect)
    goes on while the endpoint answers; `result()` waits and exits as `probe` would.

    The thread imports nothing (its client and what the call uses are made and imported
    here, first, and the verdict is printed by `result()`): a thread importing beside
    another can meet it in an import cycle. Should the call fail for any reason but the
    endpoint's answer, `result()` asks again in the caller's thread."""

    def __init__(self, cfg: Any) -> None:
        import importlib
        import threading

        from ernie_batch.config import api_key

        self._cfg, self._key = cfg, api_key(cfg)
        client = probe_client(cfg, self._key)
        for name in _PROBE_MODULES:
            importlib.import_module(name)
        self._answer: Any = None
        self._thread = threading.Thread(target=self._run, args=(client,), daemon=True,
                                        name="ernie-batch-probe")
        self._thread.start()

    def _run(self, client: Any) -> None:
        import asyncio

        with contextlib.suppress(BaseException):  # asked again in the caller's thread
            self._answer = asyncio.run(_ask_balance(client))

    def wait(self) -> None:
        """Until the endpoint answered (or the call failed)."""
        self._thread.join()

    def result(self) -> None:
        self.wait()
        if self._answer is None:
            probe(self._cfg, self._key)
        elif self._answer.problem:
            raise fail(self._answer.problem, ExitCode.FATAL)


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
