"""The job's one prompt template and answer schema, resolved from the config into a frozen value.

Templates use `$name` / `${name}` placeholders (string.Template), so JSON examples in a
prompt need no escaping. Both the config loader (which checks a template before any
request is sent) and the request builder use this module; it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from ernie_batch.errors import ConfigError
from ernie_batch.units import PageUnit

BUILTIN_VARIABLES = (
    "file_name",
    "relative_path",
    "folder",
    "page",
    "page_last",
    "page_count",
    "doc_type",
)


@dataclass(frozen=True)
class ResolvedPrompt:
    """The template text and schema a job sends, and the files they came from (None: inline)."""

    template: str
    schema: dict[str, Any] = field(hash=False)
    template_path: Path | None = None
    schema_path: Path | None = None


def check_template(template: str, extra: dict[str, str], where: str = "prompt.template") -> None:
    """Fail before any request is sent if the template names an unknown variable."""
    sample = {name: "x" for name in (*BUILTIN_VARIABLES, *extra)}
    try:
        Template(template).substitute(sample)
    except KeyError as exc:
        known = ", ".join(sorted(sample))
        raise ConfigError(f"{where}: unknown variable ${exc.args[0]} (known: {known})") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def unit_variables(unit: PageUnit, extra: dict[str, str]) -> dict[str, str]:
    doc = unit.doc
    rel = doc.relative_path
    values = {
        "file_name": doc.path.name,
        "relative_path": rel,
        "folder": rel.rpartition("/")[0],
        "page": str(unit.page),
        "page_last": str(unit.page_last),
        "page_count": "?" if unit.page_count is None else str(unit.page_count),
        "doc_type": doc.doc_type,
    }
    return {**extra, **values}


def render(template: str, unit: PageUnit, extra: dict[str, str]) -> str:
    return Template(template).substitute(unit_variables(unit, extra))
