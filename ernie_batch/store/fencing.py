"""Fencing: which shard runs' rows do not count, because their coordinator did not accept them.

A worker that lost its server may live on and keep writing after its shard was given to
another attempt. Every attempt writes under its own run id, and the coordinator's `runs` row
lists the attempts whose rows count (`accepted_runs`). The rule, here and nowhere else:

    a run R is rejected iff R's `runs` row has parent_run_id = C, C's `runs` row exists with
    kind = "coordinator", and R is not in C's accepted_runs (a null list accepts none).

Everything else counts: a run without a `runs` row (still running, or killed and not folded
yet: recovery writes its row later, with the parent from its journal header), a shard run
whose coordinator has no row yet (still running, or to be resumed), a run of another kind.

Our readers (`tables.read_columns`, `tables.read_table`: the done-index, documents, report,
reconcile, review, plan, eval) drop rejected runs' rows after reading them. Only the `runs`
rows of the run ids the rows hold are read, and of their coordinators, with filters the
`runs` files' statistics answer (a run's own row, a row with a parent): a read that
returns rows of a few runs opens a few small files, not one per run of history. The rows
stay in the tables (plain Delta readers see them); compaction deletes those of some tables
(`run.compact.DROPS_REJECTED`).
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch.location import OutputRoot, StrPath
from ernie_batch.vocab import RunKind

FENCED_TABLES = frozenset({"pages", "attempts", "documents", "runs"})  # tables with our run ids
FENCE_SCHEMA = pa.schema([
    pa.field("run_id", pa.string()),
    pa.field("kind", pa.string()),
    pa.field("parent_run_id", pa.string()),
    pa.field("accepted_runs", pa.list_(pa.string())),
])
_PAIR = "\x1f"  # joins (coordinator, shard run) ids into one comparable string
_NONE = pa.array([], pa.string())


def fenced(table: str) -> bool:
    """Whether readers drop rejected runs' rows from `table` (`billing` rows are the vendor's)."""
    return table in FENCED_TABLES


def rejected(runs: pa.Table) -> pa.Array:
    """Pure: the rule applied to `runs` rows (FENCE_SCHEMA): the rejected shard runs among
    them, judged by the coordinator rows among them; sorted, each once."""
    coordinators = runs.filter(pc.equal(runs["kind"], RunKind.COORDINATOR))
    ids = coordinators["run_id"].combine_chunks()
    shards = runs.filter(pc.is_in(runs["parent_run_id"], value_set=ids))
    if shards.num_rows == 0:
        return _NONE
    lists = coordinators["accepted_runs"].combine_chunks()
    owners = ids.take(pc.list_parent_indices(lists))
    accepted = pc.binary_join_element_wise(owners, pc.list_flatten(lists), _PAIR)
    pairs = pc.binary_join_element_wise(shards["parent_run_id"], shards["run_id"], _PAIR)
    out = shards["run_id"].filter(pc.invert(pc.is_in(pairs, value_set=accepted)))
    return pc.unique(out).sort()


def _manifests(root: StrPath | OutputRoot, where: pc.Expression | None) -> pa.Table:
    """The fence's columns of the `runs` rows `where` selects (absent columns: nulls)."""
    from ernie_batch.store.tables import read_columns

    rows = read_columns(root, "runs", FENCE_SCHEMA.names, where, include_rejected=True)
    return rows.cast(FENCE_SCHEMA) if rows is not None else FENCE_SCHEMA.empty_table()


def rejected_among(root: StrPath | OutputRoot, run_ids: Iterable[str] | pa.Array) -> pa.Array:
    """The rejected runs among `run_ids`, from their `runs` rows and their coordinators' only."""
    ids = set(run_ids.to_pylist() if isinstance(run_ids, pa.Array) else run_ids) - {None}
    if not ids:
        return _NONE
    own = _manifests(root, pc.field("run_id").isin(pa.array(sorted(ids), pa.string()))
                     & pc.field("parent_run_id").is_valid())
    parents = sorted(set(own["parent_run_id"].to_pylist()))
    if not parents:
        return _NONE
    return rejected(pa.concat_tables([
        own, _manifests(root, pc.field("run_id").isin(pa.array(parents, pa.string())))]))


def rejected_runs(root: StrPath | OutputRoot) -> pa.Array:
    """Every rejected run of the output (compaction; `report` over all runs)."""
    return rejected(_manifests(root, None))


def drop_rejected(root: StrPath | OutputRoot, rows: pa.Table) -> pa.Table:
    """`rows` less those whose `run_id` is a rejected run's (rows without one are kept).

    Judged after the rows were read, so the fence is at least as new as the rows.
    """
    if rows.num_rows == 0 or "run_id" not in rows.column_names:
        return rows
    out = rejected_among(root, pc.unique(rows["run_id"]))
    if len(out) == 0:
        return rows
    return rows.filter(pc.invert(pc.is_in(rows["run_id"], value_set=out)))
