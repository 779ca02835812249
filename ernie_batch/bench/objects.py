"""Benchmark `objects`: listing and reading 1,000 small objects, obstore against fsspec + s3fs.

The S3 API is moto's server in its own process on loopback (a Python server: its time per
request bounds both clients, so the ratio says more than the seconds). Each round lists
the prefix and reads every object's bytes with each library, its natural bulk way:

- obstore (what the product uses): one listing, then 16 threads of `get` (discovery's way);
- s3fs: `find` (one listing), then `cat` of every path (its own concurrent batch);

and then `discover` itself over the prefix (listing, filtering, sha256 of every object) and
again as a second run sees it, every (URL, ETag) known: a listing only. The headline ratio
is the first discovery's time over the second's (goal >= 3: a run over unchanged objects
reads none); `s3fs_over_obstore` is the libraries' comparison (>= 1: the chosen one is no
slower). s3fs is not a dependency: without it (`pip install s3fs`) its figures are null.
Needs `moto[server]` (the test extra).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ernie_batch.bench._http import moto_s3

OBJECTS = 1000
SIZE = 4096
BUCKET = "bench-objects"


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _obstore_round(store: Any, keys: int) -> None:
    import obstore

    metas = [m for batch in obstore.list(store, "inbox", chunk_size=1000) for m in batch]
    with ThreadPoolExecutor(16) as pool:
        read = sum(pool.map(lambda m: len(obstore.get(store, m["path"]).bytes()), metas))
    assert len(metas) == keys and read == keys * SIZE


def _s3fs_round(endpoint: str, keys: int) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    found = fs.find(f"{BUCKET}/inbox/")
    read = sum(len(v) for v in fs.cat(found).values())
    assert len(found) == keys and read == keys * SIZE


def run(scale: float = 1.0, rounds: int = 3) -> dict[str, Any]:
    import obstore

    from ernie_batch.buckets import client, resolve_access
    from ernie_batch.config import SourceOptions
    from ernie_batch.intake.discover import discover

    keys = max(10, int(OBJECTS * scale))
    with moto_s3(BUCKET) as env:
        os.environ.update(env)
        store = client(resolve_access(), "s3", BUCKET)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: obstore.put(store, f"inbox/{i:05d}.bin", os.urandom(SIZE)),
                          range(keys)))
        try:
            import s3fs  # noqa: F401 - only to know whether it can be compared
            have_s3fs = True
        except ImportError:
            have_s3fs = False
        ob, fs = [], []
        for _ in range(rounds):
            ob.append(_timed(lambda: _obstore_round(store, keys)))
            if have_s3fs:
                fs.append(_timed(lambda: _s3fs_round(env["AWS_ENDPOINT_URL"], keys)))
        opts = SourceOptions(paths=[f"s3://{BUCKET}/inbox/"])
        docs: list[Any] = []
        first = _timed(lambda: docs.extend(discover(opts)[0]))
        seen = {(str(d.path), d.etag): (d.sha256, d.doc_type) for d in docs}
        again = _timed(lambda: discover(opts, known=lambda objs: {o: seen[o] for o in objs}))
    obstore_s = statistics.median(ob)
    s3fs_s = statistics.median(fs) if fs else None
    return {
        "scenario": "objects", "objects": keys, "object_bytes": SIZE,
        "ratio": round(first / again, 3), "goal": 3.0,
        "s3fs_over_obstore": round(s3fs_s / obstore_s, 3) if s3fs_s else None,
        "obstore_list_and_read_s": round(obstore_s, 3),
        "s3fs_list_and_read_s": round(s3fs_s, 3) if s3fs_s else None,
        "discover_first_run_s": round(first, 3), "discover_known_run_s": round(again, 3),
    }
