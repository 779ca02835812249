"""The done-index in Arrow form decides exactly what the old one (a Python object per row,
`tests/done_reference.py`) decided, on random histories: mixed statuses, two fingerprints,
duplicate rows, multi-page units, a schema change between runs, commits split or compacted,
and the index read for a subset of the content only."""

from __future__ import annotations

import hashlib
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie_batch.run.compact import compact_output
from ernie_batch.store import append_rows, load_done, pages_schema
from ernie_batch.vocab import UnitStatus
from tests import done_reference

SHAS = [hashlib.sha256(bytes([i])).hexdigest() for i in range(4)]
PAGE_COUNT = {sha: 3 + i for i, sha in enumerate(SHAS)}
FPS = ["fp-a", "fp-b"]
PATHS = ["/in/a.pdf", "/in/b.pdf", "/in/c.pdf"]
UNITS = [(1, 1), (2, 2), (3, 3), (1, 2), (3, 4)]  # one-page and two-page units
# two prompt versions: a property added, another's type changed
SCHEMAS = [pages_schema([pa.field("answer_total", pa.float64())]),
           pages_schema([pa.field("answer_total", pa.string()), pa.field("answer_date", pa.string())])]
T0 = datetime(2026, 3, 1, tzinfo=UTC)

ROW = st.tuples(st.sampled_from(SHAS), st.sampled_from(FPS), st.sampled_from(UNITS),
                st.sampled_from(list(UnitStatus)), st.sampled_from(PATHS), st.booleans())
RUN = st.tuples(st.lists(ROW, min_size=1, max_size=10), st.booleans())  # rows, in two commits


def write_history(root: Path, runs: list[tuple[list[tuple], bool]]) -> None:
    """One run every 7 hours (so runs share and cross date partitions), each in one or two
    commits; at most one ok row per unit and run, as a real run writes."""
    for i, (rows, split) in enumerate(runs):
        at = T0 + timedelta(hours=7 * i)
        run_id = f"{at:%Y%m%dT%H%M%SZ}-{i:06x}"
        schema = SCHEMAS[i % 2]
        ok_units: set[tuple] = set()
        records = []
        for sha, fp, (page, last), status, path, count_known in rows:
            if status == UnitStatus.OK:
                if (sha, fp, page, last) in ok_units:
                    continue
                ok_units.add((sha, fp, page, last))
            records.append({
                "run_id": run_id, "key": f"{sha[:8]}:{page}:{last}:{fp}", "fingerprint": fp,
                "source_path": path, "source_sha256": sha, "doc_type": "pdf", "page": page,
                "page_last": last, "page_count": PAGE_COUNT[sha] if count_known else None,
                "status": str(status), "model": "m", "started_at": at, "finished_at": at})
        halves = [records[: len(records) // 2], records[len(records) // 2:]] if split else [records]
        for part in (h for h in halves if h):
            append_rows(root, "pages", pa.Table.from_pylist(part, schema=schema), f"{at:%Y-%m-%d}")


def decisions(index, fp: str, shas: list[str]) -> list:
    """Every answer the engine can ask for, in an order that exercises for_document's memory
    (a path whose duplicate rows it recorded counts as seen afterwards)."""
    out: list = []
    for sha in shas:
        for page, last in [*UNITS, (4, 4)]:
            out.append(("status", sha, page, last, index.status(sha, fp, page, last)))
            out.append(("answered_by", sha, page, last, index.answered_by(sha, fp, page, last)))
            for retry in (False, True):
                out.append(("failure_recorded", sha, page, last, retry,
                            index.failure_recorded(sha, fp, page, last, retry)))
        out.append(("answered_units", sha, index.answered_units(sha, fp)))
        for path in [*PATHS, "/in/new.pdf"]:
            for first, last_page, retry in ((1, None, False), (2, 3, False), (1, None, True)):
                out.append(("for_document", sha, path, first, last_page, retry,
                            index.for_document(sha, fp, path, first, last_page, retry)))
            for (page, last) in UNITS:
                for retry in (False, True):
                    out.append(("for_unit", sha, path, page, last, retry,
                                index.for_unit(sha, fp, page, last, path, retry)))
    return out


@settings(max_examples=60, deadline=None)
@given(runs=st.lists(RUN, min_size=1, max_size=6), fp=st.sampled_from(FPS),
       subset=st.none() | st.sets(st.sampled_from(SHAS), min_size=1), compacted=st.booleans())
def test_the_arrow_index_decides_what_the_old_one_decided(runs, fp, subset, compacted):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_history(root, runs)
        shas = sorted(subset) if subset is not None else SHAS
        expected = decisions(done_reference.load_done(root, fp), fp, shas)
        if compacted:  # sorted, merged files: the same answers
            compact_output(root, ["pages"], SCHEMAS[0])
        assert decisions(load_done(root, fp, subset), fp, shas) == expected


def test_content_not_asked_for_is_not_read(tmp_path):
    write_history(tmp_path, [([(SHAS[0], "fp-a", (1, 1), UnitStatus.OK, PATHS[0], True),
                               (SHAS[1], "fp-a", (1, 1), UnitStatus.OK, PATHS[1], True)], False)])
    index = load_done(tmp_path, "fp-a", [SHAS[1]])
    assert index.status(SHAS[1], "fp-a", 1, 1) == "ok"
    assert index.status(SHAS[0], "fp-a", 1, 1) is None  # done, but not asked about
    assert load_done(tmp_path, "fp-b").status(SHAS[1], "fp-b", 1, 1) is None
