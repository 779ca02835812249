"""What units of each document type really cost, learned from the output's own history.

Per document type: billed prompt tokens over the prompt tokens estimated before sending
(`pages.prompt_tokens_est`), and billed completion tokens per unit, over the units earlier
runs of the same model sent. Both are per unit, so retries (an invalid answer asked again, a
5xx billed) are in them. Rows of the same prompt (fingerprint) speak for a type when there are
any; otherwise the model's rows under other prompts do.

Read as a filtered scan of four columns (a second one for the types the prompt has no rows
of), summed per type by Arrow: a history of a million rows is never a million Python objects.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch import store

COLUMNS = ["doc_type", "prompt_tokens", "prompt_tokens_est", "completion_tokens"]
THIS_PROMPT = "this prompt"
THIS_MODEL = "this model, other prompts"


@dataclass(frozen=True, slots=True)
class TypeHistory:
    """What a sent unit of one document type cost, on average, in earlier runs."""

    units: int  # sent units with an estimate on record
    prompt_ratio: float  # billed prompt tokens / estimated prompt tokens (one request's)
    completion_tokens: float  # billed completion tokens per unit
    scope: str  # THIS_PROMPT or THIS_MODEL


def learn(root: store.StrPath, model: str, fingerprint: str,
          doc_types: Collection[str]) -> dict[str, TypeHistory]:
    """doc_type -> its history, for the types asked about that `model` has sent before.

    The prompt's own rows first; the model's rows under other prompts are read only for the
    types the prompt's rows do not cover (a new prompt's first plan)."""
    types = pa.array(sorted(doc_types), pa.string())
    rows = (pc.field("model") == model) & pc.field("doc_type").isin(types)
    found = _per_type(root, rows & (pc.field("fingerprint") == fingerprint), THIS_PROMPT)
    missing = pa.array(sorted(set(doc_types) - set(found)), pa.string())
    if len(missing):
        found.update(_per_type(root, (pc.field("model") == model)
                               & pc.field("doc_type").isin(missing)
                               & (pc.field("fingerprint") != fingerprint), THIS_MODEL))
    return found


def _per_type(root: store.StrPath, where: pc.Expression, scope: str) -> dict[str, TypeHistory]:
    rows = store.read_columns(root, "pages", COLUMNS, where)
    if rows is None or rows.num_rows == 0:
        return {}
    # rows written before the estimate was recorded read as null: no ratio can come of them
    rows = rows.filter(pc.fill_null(pc.greater(rows["prompt_tokens_est"], 0), False))
    sums = rows.group_by("doc_type").aggregate([
        ("prompt_tokens_est", "count"), ("prompt_tokens_est", "sum"),
        ("prompt_tokens", "sum"), ("completion_tokens", "sum")])
    out = {}
    for t in sums.to_pylist():  # one row per document type
        units, est = t["prompt_tokens_est_count"], t["prompt_tokens_est_sum"]
        out[t["doc_type"]] = TypeHistory(
            units=units, prompt_ratio=(t["prompt_tokens_sum"] or 0) / est,
            completion_tokens=(t["completion_tokens_sum"] or 0) / units, scope=scope)
    return out

