"""Flow runs a killed command left `Running`: marked `Crashed` by the next command that finds them.

A server that outlives its commands keeps what a killed one leaves behind: its flow run says
`Running` for ever. So each command using a local server holds a client lock,
`clients/<token>.lock`, and its flow runs carry the tag `ernie-batch-client:<token>`. The
kernel frees the lock when the command dies, however it dies; the next command finds the
free lock, marks that client's unfinished flow runs `Crashed` and deletes the file. With no
dead client (the usual case) this costs a directory listing, no request.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from ernie_batch.server.home import ServerHome
from ernie_batch.store.lock import FileLock

TAG_PREFIX = "ernie-batch-client:"
UNFINISHED = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")


class ClientLock:
    """This command's client lock: held while it lives, its token tags its flow runs."""

    def __init__(self, home: ServerHome) -> None:
        self.token = secrets.token_hex(8)
        self._lock = FileLock(home.clients / f"{self.token}.lock", unlink=True)

    @property
    def tag(self) -> str:
        return TAG_PREFIX + self.token

    def __enter__(self) -> ClientLock:
        self._lock.try_acquire()  # a fresh name: nobody else holds it
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def dead_clients(home: ServerHome) -> list[FileLock]:
    """The client locks whose command died, each now held by us (release() deletes it)."""
    found = []
    for path in sorted(home.clients.glob("*.lock")) if home.clients.is_dir() else []:
        lock = FileLock(path, unlink=True)
        if lock.try_acquire():
            found.append(lock)
    return found


def crash_orphans(home: ServerHome) -> int:
    """Mark the unfinished flow runs of dead clients `Crashed`; how many. Needs PREFECT_API_URL
    pointing at the home's server (the caller's `use_api`)."""
    dead = dead_clients(home)
    if not dead:
        return 0
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.states import Crashed

    crashed = 0
    with get_client(sync_client=True) as client:
        for lock in dead:
            tag = TAG_PREFIX + Path(lock.path).stem
            try:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[tag]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(UNFINISHED)))))
                for run in runs:
                    client.set_flow_run_state(run.id, Crashed(
                        message="the command running it died (killed?); found by a later "
                                "command"), force=True)
                    crashed += 1
            except Exception:  # noqa: BLE001 - best effort: the next command tries again
                lock.unlink = False
            lock.release()
    return crashed
