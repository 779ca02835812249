"""`bench history --output s3://...`: the scenario on object storage, at a tiny scale.

Not a benchmark (no time is asserted): the figures it reports must describe the tables it
wrote, read back as a user reads them (`deltalake.DeltaTable` through the AWS environment),
and what it wrote in the bucket is gone afterwards.
"""

from __future__ import annotations

from typing import Any

import obstore
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from ernie_batch.bench import history
from ernie_batch.buckets import client, resolve_access
from ernie_batch.location import Location


@pytest.mark.slow  # fresh processes measured, compaction, a bucket: ~35 s
def test_history_scenario_on_s3_reports_what_its_tables_hold(s3, monkeypatch) -> None:
    _server, bucket = s3
    seen: dict[str, Any] = {}
    delete = history._delete_prefix

    def read_then_delete(where: Location) -> int:
        """Read the outputs back as a user would, just before the scenario deletes them."""
        pages = DeltaTable(f"{where}/history/pages")
        seen["base"] = where
        seen["pages"] = pages.to_pyarrow_table(columns=["run_id", "status"])
        seen["pages_files"] = len(pages.file_uris())
        seen["runs"] = DeltaTable(f"{where}/history/runs").to_pyarrow_table(
            columns=["run_id", "outcome", "units_ok"])
        seen["empty_pages"] = DeltaTable(f"{where}/empty/pages").to_pyarrow_table(
            columns=["status"])
        return delete(where)

    monkeypatch.setattr(history, "_delete_prefix", read_then_delete)
    report = history.run(scale=0.002, output=f"s3://{bucket}/bench")

    runs = 2  # the smallest history: max(2, 1000 x scale) synthetic runs of 1,000 pages
    assert report["output"] == "object storage"
    assert report["pages_rows"] == runs * history.PAGES_PER_RUN
    assert report["new_files_ok"] == [history.NEW_FILES] * 3
    assert str(seen["base"]).startswith(f"s3://{bucket}/bench/")
    # the history as written, and the two measured runs' pages on top of it
    pages, manifests = seen["pages"], seen["runs"]
    assert pages.num_rows == report["pages_rows"] + 2 * history.NEW_FILES
    assert manifests.num_rows == runs + 2
    measured = manifests.filter(pc.field("units_ok") == history.NEW_FILES)
    assert measured["outcome"].to_pylist() == ["completed"] * 2
    theirs = pages.filter(pc.field("run_id").isin(measured["run_id"]))
    assert theirs["status"].to_pylist() == ["ok"] * 2 * history.NEW_FILES
    assert report["pages_parts"] == runs  # one data file per synthetic commit
    assert seen["pages_files"] == report["pages_files_compacted"] < runs + 2
    assert seen["empty_pages"].num_rows == history.NEW_FILES
    assert set(seen["empty_pages"]["status"].to_pylist()) == {"ok"}
    # nothing of it left in the bucket
    store = client(resolve_access(), "s3", bucket)
    assert [m for batch in obstore.list(store, "bench/") for m in batch] == []
