"""One schema per table while answer types change between prompt versions: the naming rule.

A Delta table has one schema, and `answer_<field>` may be a number in one prompt version and
a string in the next. The rule (README "Output schema"):

    `answer_<field>` keeps the type it had when the table first saw the field. Rows whose
    field has another type write it to `answer_<field>__<type>` (`__string`, `__double`,
    `__int64`, `__bool`, `__list_string`, ...), a column added on first use.

So every value stays typed, both versions read back typed (each in its own column, the
other null), nothing already written is rewritten, and a version that returns to the first
type writes to the plain name again. `answer_json` always holds the whole answer. Pure
functions: the writer applies them to the table's schema as it reads it before each commit.
"""

from __future__ import annotations

import re

import pyarrow as pa

from ernie_batch.errors import OutputError

_UNSAFE = re.compile(r"[^0-9a-z]+")


def type_token(t: pa.DataType) -> str:
    """A short name of an Arrow type for column names; equal for types a table treats alike
    (string and large_string, lists whatever their item is named)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list_{type_token(t.value_type)}"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_timestamp(t):
        return "timestamp"
    return _UNSAFE.sub("_", str(t).lower()).strip("_")


def is_answer_column(name: str) -> bool:
    """A typed answer column (`answer_<field>`), whose type the prompt version decides."""
    return name.startswith("answer_") and name != "answer_json"


def fit_names(rows: pa.Schema, table: pa.Schema | None, where: str) -> list[str]:
    """The names `rows`' columns take in a table of schema `table` (None: a new table)."""
    if table is None:
        return rows.names
    have = {f.name: type_token(f.type) for f in table}
    names = []
    for f in rows:
        token = type_token(f.type)
        known = have.get(f.name)
        if known is None or known == token or pa.types.is_null(f.type):  # null: see `fit`
            names.append(f.name)
        elif is_answer_column(f.name):
            names.append(f"{f.name}__{token}")
        else:
            raise OutputError(f"{where}: column {f.name} is {known} in the table and {token} "
                              "in the rows written")
    return names


def fit(rows: pa.Table, table: pa.Schema | None, where: str) -> pa.Table:
    """`rows` with each answer column the table holds under another type renamed by the rule;
    an untyped all-null column takes the table's type, or goes when the table has none."""
    names = fit_names(rows.schema, table, where)
    rows = rows if names == rows.column_names else rows.rename_columns(names)
    for f in rows.schema:
        if pa.types.is_null(f.type):
            i = rows.column_names.index(f.name)
            if table is not None and f.name in table.names:
                rows = rows.set_column(i, f.name, pa.nulls(rows.num_rows, table.field(f.name).type))
            else:
                rows = rows.remove_column(i)
    return rows


def merged(table: pa.Schema | None, rows: pa.Schema) -> pa.Schema:
    """The table's schema after `rows` (already fitted) are appended: new columns at the end."""
    if table is None:
        return rows
    names = set(table.names)
    return pa.schema([*table, *(f for f in rows if f.name not in names)])
