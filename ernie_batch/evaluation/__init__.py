"""`ernie-batch eval`: prompt versions scored on a labelled sample, and a gate before a backfill.

Modules: `labels` (the labels file), `score` (is a value right, by schema type: pure),
`measure` (one version's figures from the output folder), `table` (the `evals` table),
`runner` (the runs through the engine, then scoring and the gate), `truth` (the
simulator's truth map built from labels and the prepare stage).
"""

from ernie_batch.evaluation.labels import Label, LabelSet, read_labels
from ernie_batch.evaluation.measure import FieldScore, VersionScore, measure
from ernie_batch.evaluation.runner import EvalResult, Version, eval_overrides, judge, run_eval
from ernie_batch.evaluation.score import Tolerances, correct, overlap

__all__ = [
    "EvalResult", "FieldScore", "Label", "LabelSet", "Tolerances", "Version", "VersionScore",
    "correct", "eval_overrides", "judge", "measure", "overlap", "read_labels", "run_eval",
]
