"""A stop that reaches every shard run of a coordinator through Prefect, within a second or two.

* A fatal API error (401, 403, …) or a budget stop in one shard run writes the Prefect
  Variable `ernie_stop_<coordinator run id>` (the first one stays). Every shard run of that
  coordinator reads it when it joins the key's limit and before each step of its membership
  (every `limit_share.REFRESH_S`), and stops with the same reason: no more requests, those in
  flight come back, what came is written. A shard run that starts later stops at its start.
* A shard run whose own flow run is no longer running in Prefect's eyes stops: one marked
  `Crashed` (its worker went silent and its shard went to a new attempt) that comes back
  never sends again; that is how a fenced attempt learns it was replaced. It looks after
  any stall (before its membership renews anything) and every `FLOW_RUN_EVERY_S` besides.
* Ctrl-C (or SIGTERM) at the coordinator cancels its shard runs through Prefect: each
  worker sends its shard run SIGTERM, which stops it gracefully (`flows.shard`).

The coordinator deletes the variable when it has written its own row.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from ernie_batch.vocab import RunOutcome

PREFIX = "ernie_stop_"
STOPS_EVERY_SHARD = (RunOutcome.FATAL_API_ERROR, RunOutcome.BUDGET_STOPPED)
RUNNING = {"RUNNING"}  # a shard run's own flow run in any other state: it stops
FLOW_RUN_EVERY_S = 10.0  # its own flow run's state is read this often, and after a stall
STALL_S = 3.0  # a gap this long between two checks: it was stalled (suspended, cut off)


def stop_name(coordinator_run_id: str) -> str:
    return PREFIX + coordinator_run_id.lower()


async def read_stop(client: Any, coordinator_run_id: str) -> dict[str, Any] | None:
    """The coordinator's stop, if one was raised: reason, error, shard."""
    variable = await client.read_variable_by_name(stop_name(coordinator_run_id))
    value = variable.value if variable is not None else None
    return value if isinstance(value, dict) else None


async def raise_stop(client: Any, coordinator_run_id: str, reason: RunOutcome,
                     error: str | None, shard: int | None) -> None:
    """Stop every shard run of the coordinator (the first stop raised stays)."""
    from prefect.client.schemas.actions import VariableCreate
    from prefect.exceptions import ObjectAlreadyExists

    value = {"reason": str(reason), "error": error, "shard": shard}
    with contextlib.suppress(ObjectAlreadyExists):
        await client.create_variable(VariableCreate(name=stop_name(coordinator_run_id),
                                                    value=value))


async def clear_stop(client: Any, coordinator_run_id: str) -> None:
    from prefect.exceptions import ObjectNotFound

    with contextlib.suppress(ObjectNotFound):
        await client.delete_variable_by_name(stop_name(coordinator_run_id))


class ShardWatch:
    """A shard run's side: raise the stop its run meets, obey one raised elsewhere, stop when
    its flow run is no longer running. `check` is a `LimitShare` check."""

    def __init__(self, coordinator_run_id: str, shard: int, flow_run_id: str | None,
                 stop: Callable[[RunOutcome, str | None], None]) -> None:
        self.coordinator, self.shard, self.flow_run_id = coordinator_run_id, shard, flow_run_id
        self.stop = stop
        self._raising: list[asyncio.Task[None]] = []
        self._stopped = False
        self._checked = self._flow_run_read = -float("inf")  # monotonic

    async def check(self, client: Any) -> None:
        if self._stopped:
            return
        flag = await read_stop(client, self.coordinator)
        if flag is not None:
            self._stopped = True
            self.stop(RunOutcome(flag["reason"]), flag.get("error"))
            return
        now = time.monotonic()
        stalled, self._checked = now - self._checked > STALL_S, now
        if self.flow_run_id is not None and (stalled or
                                             now - self._flow_run_read > FLOW_RUN_EVERY_S):
            self._flow_run_read = now
            flow_run = await client.read_flow_run(self.flow_run_id)
            state = flow_run.state.type.value if flow_run.state is not None else None
            if state not in RUNNING:
                self._stopped = True
                self.stop(RunOutcome.INTERRUPTED, f"its flow run is {state}: this attempt was "
                          "replaced or cancelled (fenced: its rows will not count)")

    def raised(self, reason: RunOutcome, error: str | None) -> None:
        """A `RunStop` listener: this run's own fatal error or budget stop stops the others."""
        if reason in STOPS_EVERY_SHARD and not self._stopped:
            self._stopped = True
            self._raising.append(asyncio.ensure_future(self._raise(reason, error)))

    async def _raise(self, reason: RunOutcome, error: str | None) -> None:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            await raise_stop(client, self.coordinator, reason, error, self.shard)

    async def aclose(self) -> None:
        """Wait until a stop raised here is written."""
        if self._raising:
            await asyncio.gather(*self._raising)
