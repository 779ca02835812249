"""Which runs a command looks at: `--run ID` (repeatable), or `--since D [--until D]`, or the newest run.

Shared by `report`, `reconcile`, `review` and `documents`. A coordinator's run id selects it
and its shard runs (those it rejected only when asked: `report` lists them as orphaned,
`reconcile` counts what the vendor billed them); dates are UTC and compare with a run's
start. Runs are found in the `runs` table and, for runs still working or killed before their
manifest, in `pages`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch.discover import parse_bound
from ernie_batch.store import read_columns


@dataclass(frozen=True)
class RunSelection:
    run_ids: tuple[str, ...] = ()
    since: str | None = None  # ISO date or datetime, UTC, inclusive
    until: str | None = None  # exclusive

    @property
    def describe(self) -> str:
        if self.run_ids:
            return "run " + ", ".join(self.run_ids)
        if self.since or self.until:
            return f"runs started in [{self.since or '…'}, {self.until or '…'})"
        return "the newest run"

    def resolve(self, root: Path, *, include_rejected: bool = False) -> list[str]:
        """The selected run ids, shard runs of selected coordinators included (rejected ones
        with `include_rejected`, see `store.fencing`), oldest first."""
        runs = _known_runs(root, include_rejected)
        if not runs:
            return list(self.run_ids)
        ids, starts, parents = (runs[c].to_pylist() for c in ("run_id", "started_at",
                                                              "parent_run_id"))
        if self.run_ids:
            chosen = set(self.run_ids)
        elif self.since or self.until:
            lo = parse_bound(self.since, "--since")
            hi = parse_bound(self.until, "--until")
            chosen = {rid for rid, at, parent in zip(ids, starts, parents, strict=True)
                      if parent is None and at is not None and (lo is None or at >= lo)
                      and (hi is None or at < hi)}
        else:
            top = [(at, rid) for rid, at, parent in zip(ids, starts, parents, strict=True)
                   if parent is None and at is not None]
            chosen = {max(top)[1]} if top else set()
        chosen |= {rid for rid, parent in zip(ids, parents, strict=True) if parent in chosen}
        order = {rid: at for rid, at in zip(ids, starts, strict=True)}
        return sorted(chosen, key=lambda rid: (order.get(rid) is None, order.get(rid), rid))


def _known_runs(root: Path, include_rejected: bool) -> pa.Table | None:
    """run_id, started_at, parent_run_id of every run with a manifest or with page rows."""
    runs = read_columns(root, "runs", ["run_id", "started_at", "parent_run_id"],
                        include_rejected=include_rejected)
    pages = read_columns(root, "pages", ["run_id", "started_at"],
                         include_rejected=include_rejected)
    tables = []
    if runs is not None and runs.num_rows:
        tables.append(runs)  # manifests written before shard runs: parent_run_id null
    if pages is not None and pages.num_rows:
        first = pages.group_by("run_id").aggregate([("started_at", "min")])
        first = first.rename_columns(["run_id", "started_at"])
        known = set(tables[0]["run_id"].to_pylist()) if tables else set()
        first = first.filter(pc.invert(pc.is_in(first["run_id"], pa.array(list(known),
                                                                            pa.string()))))
        tables.append(first.append_column("parent_run_id",
                                          pa.nulls(first.num_rows, pa.string()))
                      .cast(tables[0].schema if tables else first.schema))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default")
