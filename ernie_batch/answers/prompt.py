"""The request body for one unit, built around the job's one template, and the keys that name answers.

The fingerprint covers the template's text, never its rendered text: a file's name or path
never changes a unit's key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ernie_batch.answers import evidence
from ernie_batch.answers.template import render
from ernie_batch.api import tokens
from ernie_batch.config import JobConfig
from ernie_batch.intake.content import media_part_json
from ernie_batch.intake.units import PageUnit

# response_format modes, best first; a 400 rejecting one moves the run to the next, for good
FORMAT_MODES = ("json_schema", "json_object", "text")

SCHEMA_INSTRUCTION = "Answer with one JSON object only, following this JSON Schema:\n```json\n{}\n```"


def fingerprint(cfg: JobConfig) -> str:
    """sha256 of everything that shapes an answer: template, schema, model, parameters, preprocessing."""
    shaping = {
        "template": cfg.resolved.template,
        "variables": cfg.prompt.variables,
        "schema": cfg.resolved.sent_schema,  # x- keywords (merge rules) never re-send a page
        "model": cfg.api.model,
        "request": cfg.request.model_dump(mode="json"),
        "images": cfg.images.model_dump(mode="json"),
        "pdf": cfg.pdf.model_dump(mode="json", exclude={"password"}),
    }
    if cfg.prompt.evidence:  # only when on: fingerprints of jobs without it stay as they were
        shaping["evidence"] = {"instruction": evidence.INSTRUCTION,
                               "paths": evidence.request_paths(cfg.resolved.schema)}
    canonical = json.dumps(shaping, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def unit_key(source_sha256: str, page: int, page_last: int, fp: str) -> str:
    return hashlib.sha256(f"{source_sha256}:{page}:{page_last}:{fp}".encode()).hexdigest()


def response_format(cfg: JobConfig, mode: str) -> dict[str, Any] | None:
    if mode == "json_schema":
        schema = cfg.resolved.sent_schema
        if cfg.prompt.evidence:
            schema = evidence.wrapper_schema(schema, cfg.resolved.schema, cfg.request.strict)
        return {
            "type": "json_schema",
            "json_schema": {
                "name": cfg.prompt.schema_name,
                "schema": schema,
                "strict": cfg.request.strict,
            },
        }
    if mode == "json_object":
        return {"type": "json_object"}
    return None


def expected_completion_tokens(cfg: JobConfig) -> int:
    """Completion tokens to expect of one answer, for estimates made before it exists:
    `budget.expected_completion_tokens` when set, else a typical answer of the schema sent;
    with `prompt.evidence`, a quote per field besides; never more than `request.max_tokens`."""
    guess = cfg.budget.expected_completion_tokens
    if guess is None:
        guess = tokens.answer_tokens(cfg.resolved.sent_schema)
    if cfg.prompt.evidence:
        guess += evidence.extra_completion_tokens(cfg.resolved.schema)
    return min(guess, cfg.request.max_tokens)


def build_body(cfg: JobConfig, unit: PageUnit, mode: str, temperature: float) -> dict[str, Any]:
    """The chat-completions body for one unit; instructions in the user message by default."""
    text = render(cfg.resolved.template, unit, cfg.prompt.variables)
    if mode != "json_schema":
        sent = cfg.resolved.sent_schema
        text += "\n\n" + (evidence.text_instruction(sent) if cfg.prompt.evidence
                           else SCHEMA_INSTRUCTION.format(json.dumps(sent, indent=1)))
    elif cfg.prompt.evidence:
        text += "\n\n" + evidence.INSTRUCTION
    media = [media_part_json(p, cfg.request.image_detail) for p in unit.parts]
    messages: list[dict[str, Any]]
    if cfg.request.system_message:
        messages = [
            {"role": "system", "content": text},
            {"role": "user", "content": media},
        ]
    else:
        messages = [{"role": "user", "content": [{"type": "text", "text": text}, *media]}]
    body: dict[str, Any] = {
        "model": cfg.api.model,
        "messages": messages,
        "max_tokens": cfg.request.max_tokens,
        "temperature": round(min(temperature, 2.0), 4),
    }
    if cfg.request.top_p is not None:
        body["top_p"] = cfg.request.top_p
    if cfg.request.seed is not None:
        body["seed"] = cfg.request.seed
    fmt = response_format(cfg, mode)
    if fmt is not None:
        body["response_format"] = fmt
    return body
