"""An eval: each prompt version run on the labelled units through the engine, then scored,
compared and recorded in the `evals` table.

The runs are ordinary runs (kind `eval`) into one output folder: a unit a version already
answered there is not sent again, so a second eval over the same versions costs nothing.
They call the engine directly, not through Prefect: an eval is a measurement over a
sample of tens of units, started from a terminal; Prefect's server start-up would cost
more than the runs, and there is nothing to schedule (see README "Evaluating prompt versions").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydantic import SecretStr

from ernie_batch import store
from ernie_batch.answers.prompt import fingerprint
from ernie_batch.config import JobConfig
from ernie_batch.evaluation.labels import LabelSet
from ernie_batch.evaluation.measure import VersionScore, measure
from ernie_batch.evaluation.score import Tolerances
from ernie_batch.evaluation.table import rows, write_evals
from ernie_batch.run.engine import RunOptions, run_pipeline
from ernie_batch.run.summary import RunSummary
from ernie_batch.vocab import RunKind, RunOutcome

# a run that ends so stops the eval: scores of a half-run version would mislead
STOPPING = (RunOutcome.FATAL_API_ERROR, RunOutcome.BUDGET_STOPPED, RunOutcome.INTERRUPTED)
SLACK = 1e-9  # accuracies are ratios of small integers: 0.90 - 0.88 must not exceed 0.02


@dataclass(frozen=True)
class Version:
    """One prompt version: its config as given on the command line, loaded for the eval."""

    name: str  # the path as given
    cfg: JobConfig
    key: SecretStr = field(repr=False)


@dataclass
class EvalResult:
    eval_id: str
    scores: list[VersionScore] = field(default_factory=list)
    runs: list[RunSummary] = field(default_factory=list)
    stopped: RunSummary | None = None  # the run that stopped the eval: nothing was scored
    best: str | None = None
    gated: str | None = None  # the gated version, when it fell more than max_drop behind
    part: str | None = None  # the evals table written to

    def as_json(self) -> dict[str, object]:
        """`--json` (CONTRACT "JSON lines")."""
        return {"versions": [s.as_json() for s in self.scores], "best": self.best}


def eval_overrides(files: list[Path]) -> dict[str, object]:
    """What an eval run changes in each config: its sources are the labelled files, and no
    date, glob or age filter passes one over (None restores a field's default)."""
    return {"sources.paths": [str(p) for p in files], "sources.since": None,
            "sources.until": None, "sources.include": None, "sources.exclude": None,
            "sources.settle_seconds": None}


def judge(scores: list[VersionScore], gate: str | None, max_drop: float
          ) -> tuple[str | None, str | None]:
    """(the most accurate version, the first given on a tie; the gated version if it fell
    more than `max_drop` below the best of the others)."""
    if not scores:
        return None, None
    acc = [s.accuracy or 0.0 for s in scores]
    best = scores[max(range(len(scores)), key=lambda i: (acc[i], -i))].config
    if gate is None:
        return best, None
    mine = next((i for i, s in enumerate(scores) if s.config == gate), None)
    if mine is None:
        raise ValueError(f"the gated version {gate} is not among those evaluated")
    others = [a for i, a in enumerate(acc) if i != mine]
    fell = bool(others) and max(others) - acc[mine] > max_drop + SLACK
    return best, gate if fell else None


async def run_eval(versions: list[Version], labels: LabelSet, root: store.OutputRoot, *,
                   gate: str | None = None, max_drop: float = 0.0, wait_lock_s: float = 0.0,
                   on_run: Callable[[Version, RunSummary], None] | None = None) -> EvalResult:
    """Run each version on the labelled units, score them all, write the `evals` rows."""
    started = datetime.now(UTC)
    result = EvalResult(eval_id=store.new_run_id(started))
    for version in versions:
        opts = RunOptions(kind=RunKind.EVAL, select=labels.selection(), wait_lock_s=wait_lock_s)
        summary = await run_pipeline(version.cfg, version.key, opts, labels.files)
        result.runs.append(summary)
        if on_run is not None:
            on_run(version, summary)
        if summary.outcome in STOPPING:
            result.stopped = summary
            return result
    for version, summary in zip(versions, result.runs, strict=True):
        cfg = version.cfg
        score = measure(root, fingerprint(cfg), cfg.resolved.sent_schema,
                        Tolerances(cfg.eval.tolerances, cfg.eval.default_tolerance), labels,
                        version.name)
        score.run_id, score.prompt_label = summary.run_id, cfg.prompt.label
        result.scores.append(score)
    result.best, result.gated = judge(result.scores, gate, max_drop)
    table = rows(result.eval_id, result.scores, result.best, result.gated,
                 [str(v.cfg.config_path) if v.cfg.config_path else None for v in versions],
                 labels.source, started)
    result.part = write_evals(root, result.eval_id, f"{started:%Y-%m-%d}", table)
    return result
