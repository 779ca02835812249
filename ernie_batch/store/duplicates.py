"""Giving every path its answer: a `duplicate` row takes the answer of the row it points at.

A duplicate row (same content as another path) carries no answer of its own, only where the
answer is (`duplicate_of_path`, `duplicate_of_run`; same `key`). Reading with
`read_table(..., resolve_duplicates=True)` fills its `answer_json` and `answer_<field>`
columns from that row; its status stays `duplicate`, so it is still told apart.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from ernie_batch.vocab import UnitStatus


def _ids(table: pa.Table, path: str, run: str) -> pa.ChunkedArray:
    return pc.binary_join_element_wise(table["key"], table[path], table[run], "\x1f")


def resolve_duplicates(pages: pa.Table) -> pa.Table:
    """The pages table with each duplicate row's answer columns taken from its original."""
    needed = {"key", "status", "source_path", "run_id", "duplicate_of_path", "duplicate_of_run"}
    if not needed <= set(pages.column_names):
        return pages  # written before duplicate rows named their answer
    is_dup = pc.equal(pages["status"], UnitStatus.DUPLICATE)
    if not pc.any(is_dup).as_py():
        return pages
    ok = pages.filter(pc.equal(pages["status"], UnitStatus.OK))
    at = pc.index_in(_ids(pages, "duplicate_of_path", "duplicate_of_run"),
                     value_set=_ids(ok, "source_path", "run_id").combine_chunks())
    take = pc.and_(is_dup, pc.is_valid(at)).fill_null(False)
    answers = [c for c in pages.column_names if c.startswith("answer_")]
    for name in answers:
        original = ok[name].take(at.fill_null(0)) if ok.num_rows else pages[name]
        column = pc.if_else(take, original, pages[name])
        pages = pages.set_column(pages.column_names.index(name), name, column)
    return pages
