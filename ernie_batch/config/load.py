"""A config file read: TOML -> a validated `JobConfig`, its prompt resolved; and the API key.

Precedence: CLI flags beat the file, the file beats the defaults. The API key is never in
the file: it comes from the environment (or a Prefect Secret block) as a SecretStr.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from ernie_batch.answers.template import ResolvedPrompt, check_template
from ernie_batch.config.sections import DEFAULT_SCHEMA, DEFAULT_TEMPLATE, JobConfig, PromptOptions
from ernie_batch.errors import ConfigError


def _format_validation_error(path: Path | str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{path}: {where}: {msg}{more}"


def _resolve(base: Path, p: Path) -> Path:
    p = p.expanduser()
    return p if p.is_absolute() else (base / p)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read, validate and resolve a job config. Raises ConfigError with one line.

    Relative paths in the file are relative to the current directory (where the user runs
    the command), except template_file and schema_file, which are relative to the file.
    `overrides` maps dotted names ("limits.rpm") to values that beat the file; a None value
    clears the field back to its default (a flag not given must not be in `overrides`).
    """
    data: dict[str, Any] = {}
    where: Path | str = "(defaults)"
    if path is not None:
        where = Path(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
    for dotted, value in (overrides or {}).items():  # None clears a field back to its default
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(where, exc)) from None
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    resolved = _resolve_prompt(cfg.prompt, base, where)
    check_template(resolved.template, cfg.prompt.variables, f"{where}: prompt.template")
    return cfg.model_copy(update={
        "config_path": Path(path).resolve() if path is not None else None,
        "resolved": resolved,
    })


def _resolve_prompt(p: PromptOptions, base: Path, where: Path | str) -> ResolvedPrompt:
    """Read the template and schema files (relative to the config file) and check the schema."""
    template = p.template if p.template is not None else DEFAULT_TEMPLATE
    template_path = None
    if p.template_file is not None:
        template_path = _resolve(base, p.template_file)
        try:
            template = template_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{where}: prompt.template_file: cannot read {template_path}: "
                              f"{exc.strerror}") from None
    schema = p.output_schema if p.output_schema is not None else DEFAULT_SCHEMA
    schema_path = None
    if p.schema_file is not None:
        schema_path = _resolve(base, p.schema_file)
        try:
            schema = json.loads(schema_path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{where}: prompt.schema_file: cannot read {schema_path}: "
                              f"{exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: prompt.schema_file: {schema_path} is not JSON: {exc}") from None
    _check_schema(schema, where)
    resolved = ResolvedPrompt(template, schema, template_path, schema_path)
    try:
        resolved.merge_rules  # noqa: B018 - an unknown or unfitting x-merge fails here, once
    except ConfigError as exc:
        raise ConfigError(f"{where}: prompt.schema: {exc}") from None
    return resolved


def _check_schema(schema: Any, where: Path | str) -> None:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ConfigError(f"{where}: prompt.schema: must be a JSON Schema with type 'object'")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ConfigError(f"{where}: prompt.schema: not a valid JSON Schema: {exc.message}") from None


def api_key(cfg: JobConfig, environ: dict[str, str] | None = None) -> SecretStr:
    """The API key from the environment (or the configured Prefect Secret block)."""
    env = os.environ if environ is None else environ
    value = env.get(cfg.api.api_key_env, "").strip()
    if not value and cfg.api.secret_block:
        value = _secret_from_block(cfg.api.secret_block)
    if not value:
        raise ConfigError(
            f"missing API key: set the environment variable {cfg.api.api_key_env} "
            f"(the endpoint is {cfg.api.base_url})"
        )
    return SecretStr(value)


def _secret_from_block(name: str) -> str:
    try:
        from prefect.blocks.system import Secret

        return str(Secret.load(name, _sync=True).get())  # sync even inside the flow's loop
    except Exception as exc:  # noqa: BLE001 - any failure to load is one clear line
        raise ConfigError(f"cannot load the Prefect Secret block {name!r}: {type(exc).__name__}") from None
