"""The `evals` table: one row per (eval, config, field) and each config's totals (`field = "*"`).

Partitioned by the eval's start date (`OUTPUT/evals`, a Delta table: `date=D`), committed
once, after every version was run and scored.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from ernie_batch import store
from ernie_batch.evaluation.measure import VersionScore

TOTAL = "*"


def rows(eval_id: str, scores: list[VersionScore], best: str | None, gated: str | None,
         config_paths: list[str | None], labels_path: Path, created_at: datetime
         ) -> list[dict[str, Any]]:
    """The table's rows: each version's fields, then its totals."""
    out = []
    for score, config_path in zip(scores, config_paths, strict=True):
        common = {"eval_id": eval_id, "config": score.config, "fingerprint": score.fingerprint,
                  "run_id": score.run_id, "prompt_label": score.prompt_label,
                  "config_path": config_path, "labels_path": str(labels_path),
                  "created_at": created_at}
        for name, f in score.fields.items():
            out.append({**common, "field": name, "n": f.n, "correct": f.correct,
                        "accuracy": f.accuracy, "precision": f.precision, "recall": f.recall,
                        "f1": f.f1})
        out.append({**common, "field": TOTAL, "n": score.n, "correct": score.correct,
                    "accuracy": score.accuracy, "units": score.units, "pages": score.pages,
                    "invalid_rate": score.invalid_rate, "credits": score.credits,
                    "usd": score.usd, "credits_per_page": score.credits_per_page,
                    "usd_per_page": score.usd_per_page,
                    "cost_per_correct_field": score.cost_per_correct_field,
                    "latency_mean_s": score.latency_mean_s, "latency_p95_s": score.latency_p95_s,
                    "best": score.config == best, "gated": score.config == gated})
    return out


def write_evals(root: store.OutputRoot, eval_id: str, date: str,
                table_rows: list[dict[str, Any]]) -> str:
    """Commit the rows (once for the eval id); returns the table's folder."""
    writer = store.TableWriter(root, "evals", store.EVALS_SCHEMA, date,
                               app=store.app_id(eval_id, "evals"))
    for row in table_rows:
        writer.add(row)
    writer.flush()
    return store.OutputRoot.of(root).table_uri("evals")
