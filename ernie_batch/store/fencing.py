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
rows of the run ids the rows hold are consulted, and of their coordinators: a run's own
manifest is found by its name (`run-<run_id>.parquet`, one row, `tables.write_run_row`),
other files of the table (compacted ones, holding many runs) are always read. A read that
returns rows of a few runs costs a few small files, not one per run of history. The rows stay
on disk (plain Parquet readers see them); compaction drops those of some tables
(`compact.DROPS_REJECTED`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ernie_batch.store.snapshot import read_files
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


def rejected_among(root: Path, run_ids: Iterable[str] | pa.Array) -> pa.Array:
    """The rejected runs among `run_ids`, from their `runs` rows and their coordinators' only."""
    ids = set(run_ids.to_pylist() if isinstance(run_ids, pa.Array) else run_ids) - {None}
    if not ids:
        return _NONE

    def judge(files: list[Path]) -> pa.Array:
        manifests = _Manifests(files)
        own = manifests.rows_of(ids, shards_only=True)
        parents = set(own["parent_run_id"].drop_null().to_pylist())
        if not parents:
            return _NONE
        return rejected(pa.concat_tables([own, manifests.rows_of(parents)]))

    return read_files(root, "runs", judge)


def rejected_runs(root: Path) -> pa.Array:
    """Every rejected run of the output folder (compaction; `report` over all runs)."""
    return read_files(root, "runs", lambda files: rejected(_Manifests(files).every()))


def drop_rejected(root: Path, rows: pa.Table) -> pa.Table:
    """`rows` less those whose `run_id` is a rejected run's (rows without one are kept).

    Judged after the rows were read, so the fence is at least as new as the rows.
    """
    if rows.num_rows == 0 or "run_id" not in rows.column_names:
        return rows
    out = rejected_among(root, pc.unique(rows["run_id"]))
    if len(out) == 0:
        return rows
    return rows.filter(pc.invert(pc.is_in(rows["run_id"], value_set=out)))


class _Manifests:
    """The `runs` table's files, each read at most once: a run's own by its name, the others
    (compacted: many runs each) for every lookup."""

    def __init__(self, files: list[Path]) -> None:
        self.own: dict[str, Path] = {}
        self.shared: list[Path] = []
        for path in files:
            if path.name.startswith("run-") and path.suffix == ".parquet":
                self.own[path.name.removeprefix("run-").removesuffix(".parquet")] = path
            else:
                self.shared.append(path)
        self._read: dict[Path, pa.Table] = {}

    def rows_of(self, ids: set[str], shards_only: bool = False) -> pa.Table:
        """The rows of `ids`; with `shards_only`, manifests whose footer shows no parent are
        not read (nor returned)."""
        own = [self.own[i] for i in sorted(ids) if i in self.own]
        if shards_only:
            own = [p for p in own if _may_have_parent(p)]
        rows = self._rows(own + self.shared)
        return rows.filter(pc.is_in(rows["run_id"], value_set=pa.array(sorted(ids), pa.string())))

    def every(self) -> pa.Table:
        return self._rows([*self.own.values(), *self.shared])

    def _rows(self, paths: list[Path]) -> pa.Table:
        for path in paths:
            if path not in self._read:
                self._read[path] = _fence_columns(path)
        return pa.concat_tables([FENCE_SCHEMA.empty_table(), *(self._read[p] for p in paths)])


def _may_have_parent(path: Path) -> bool:
    """False when the footer's statistics show `parent_run_id` null in every row (or the
    column absent): most manifests are ruled out without reading a data page (a third of the
    time of reading their columns)."""
    meta = pq.read_metadata(path)
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        column = next((group.column(c) for c in range(group.num_columns)
                       if group.column(c).path_in_schema == "parent_run_id"), None)
        if column is None:
            continue
        stats = column.statistics
        if stats is None or not stats.has_null_count or stats.null_count != group.num_rows:
            return True
    return False


def _fence_columns(path: Path) -> pa.Table:
    """The fence's columns of one `runs` file; absent from manifests older than shard runs: null.

    File by file, each closed after it is read: no footer of a long history is held at once.
    """
    with pq.ParquetFile(path) as handle:
        names = handle.schema_arrow.names
        got = handle.read(columns=[c for c in FENCE_SCHEMA.names if c in names])
    return pa.table({f.name: got[f.name] if f.name in got.column_names
                     else pa.nulls(got.num_rows, f.type) for f in FENCE_SCHEMA},
                    schema=FENCE_SCHEMA)
