"""Leases an object store can hold (If-None-Match / If-Match on a real S3 API on loopback), and
flock behind the same interface on a local folder."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from ernie_batch.errors import LeaseLost
from ernie_batch.location import Location
from ernie_batch.store.lease import ObjectLease, kept, open_lease


def _contend(*leases: ObjectLease) -> list[bool]:
    """Every lease tries at the same instant; who got it."""
    start = threading.Barrier(len(leases))
    got = [False] * len(leases)

    def attempt(i: int) -> None:
        start.wait()
        got[i] = leases[i].try_acquire()

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_the_loopback_s3_honours_conditional_writes(s3) -> None:
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    from ernie_batch.buckets import client, resolve_access

    _, bucket = s3
    store = client(resolve_access(), "s3", bucket)
    first = obstore.put(store, "k", b"1", mode="create")["e_tag"]
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "k", b"2", mode="create")  # If-None-Match: *
    obstore.put(store, "k", b"3", mode={"e_tag": first})  # If-Match, current
    with pytest.raises(PreconditionError):
        obstore.put(store, "k", b"4", mode={"e_tag": first})  # If-Match, stale


def test_a_folder_lease_is_flock_behind_the_same_interface(tmp_path: Path) -> None:
    where = Location.parse(tmp_path / ".lock")
    a, b = open_lease(where, {"run_id": "a"}), open_lease(where, {"run_id": "b"})
    assert a.try_acquire() and a.held
    assert not b.try_acquire() and b.holder() == {"run_id": "a"}
    a.renew()
    a.release()
    assert b.acquire(wait_s=1) and b.holder() == {"run_id": "b"}
    b.release()
    with pytest.raises(LeaseLost):
        b.renew()


def test_an_object_lease_goes_to_one_creator_and_changes_hands_by_compare_and_swap(s3) -> None:
    server, bucket = s3
    where = Location.parse(f"s3://{bucket}/out/_leases/run.json")
    a, b = (open_lease(where, {"run_id": n}, ttl_s=30) for n in ("a", "b"))
    assert sorted(_contend(a, b)) == [False, True]  # If-None-Match: * lets one create it
    holder, other = (a, b) if a.held else (b, a)
    assert other.holder() == holder.info and not other.try_acquire()  # alive: not taken
    holder.renew()
    holder.renew()
    assert not other.try_acquire()
    holder.release()
    assert other.holder() == {}
    assert other.try_acquire() and other.holder() == other.info  # released: taken at once
    with pytest.raises(LeaseLost, match="not held"):
        holder.renew()  # released is released
    assert any(status == 412 for method, path, status in server.requests
               if method == "PUT" and path == f"/{bucket}/out/_leases/run.json")


def test_a_lapsed_lease_is_taken_over_by_exactly_one_contender(s3) -> None:
    _, bucket = s3
    where = Location.parse(f"s3://{bucket}/out/_leases/compact.json")
    a, b, c = (open_lease(where, {"run_id": n}, ttl_s=2.5) for n in ("a", "b", "c"))
    assert a.try_acquire()
    with kept(a, every_s=0.5) as lost:  # renewed: never lapses, however long it is held
        until = time.monotonic() + 4.5
        while time.monotonic() < until:
            assert not b.try_acquire()
            time.sleep(0.3)
        assert not lost.is_set()
    # a stops renewing (a paused or dead holder): after ttl + 1 s by the store's clock
    deadline = time.monotonic() + 20
    while True:
        got = _contend(b, c)
        if any(got):
            break
        assert time.monotonic() < deadline, "the lease never lapsed"
        time.sleep(0.2)
    assert got.count(True) == 1  # compare and swap on the lapsed ETag: one winner
    winner = b if got[0] else c
    assert (b if winner is c else c).holder() == winner.info
    assert not a.held  # its own clock told it too
    with pytest.raises(LeaseLost, match="taken over"):
        a.renew()  # its ETag is stale: If-Match refused it
    with kept(winner, every_s=0.1) as kept_winner, kept(a, every_s=0.1) as lost:
        assert lost.wait(5)  # a holder that lost it is told so by its renewals
    assert not kept_winner.is_set() and winner.held and winner.holder() == winner.info


def test_a_lease_shorter_than_the_store_can_judge_is_refused(s3) -> None:
    _, bucket = s3
    with pytest.raises(ValueError, match="whole seconds"):
        open_lease(Location.parse(f"s3://{bucket}/l.json"), {}, ttl_s=1)
