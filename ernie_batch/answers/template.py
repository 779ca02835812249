"""The job's one prompt template and answer schema, resolved from the config into a frozen value.

Templates use `$name` / `${name}` placeholders (string.Template), so JSON examples in a
prompt need no escaping. Both the config loader (which checks a template before any
request is sent) and the request builder use this module; it imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from string import Template
from typing import Any

from ernie_batch.answers.merge import rules_of
from ernie_batch.errors import ConfigError
from ernie_batch.intake.units import PageUnit
from ernie_batch.vocab import MergeRule

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
    """The template text and schema a job sends, and the files they came from (None: inline).

    `schema` is the schema as written; `sent_schema` is what is sent, hashed into the
    fingerprint and validated against: the same without `x-` keywords, so changing a merge
    rule never re-sends (nor re-pays) a page.
    """

    template: str
    schema: dict[str, Any] = field(hash=False)
    template_path: Path | None = None
    schema_path: Path | None = None

    @cached_property
    def sent_schema(self) -> dict[str, Any]:
        return strip_extensions(self.schema)

    @cached_property
    def merge_rules(self) -> dict[str, MergeRule]:
        """Each top-level property's `x-merge` rule (or its default); checked at config load."""
        return rules_of(self.schema)


# keywords whose value maps names to subschemas: their keys are names, never keywords
_NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions",
                        "dependentSchemas"})
# keywords whose value is data, not a schema: left exactly as written
_DATA = frozenset({"enum", "const", "default", "examples", "required", "dependentRequired"})


def strip_extensions(schema: Any) -> Any:
    """The schema without `x-` keywords at any depth (property names are never touched).

    A schema without them comes back equal, so its fingerprint does not change.
    """
    if isinstance(schema, list):
        return [strip_extensions(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-"):
            continue
        if key in _NAME_MAPS and isinstance(value, Mapping):
            out[key] = {name: strip_extensions(sub) for name, sub in value.items()}
        elif key in _DATA:
            out[key] = value
        else:
            out[key] = strip_extensions(value)
    return out


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
