"""`ernie-batch deploy`: the process work pool and the shard flow's deployment on a Prefect server.

Idempotent: the pool is created when missing, the deployment created or updated. The
deployment's entrypoint is a module path (`flows.shard.shard`), so a worker runs the
installed package whatever its working folder; its environment gets
`PREFECT_FLOWS_HEARTBEAT_FREQUENCY` (heartbeats, for the coordinator to notice a dead worker).
Workers are Prefect's own (`prefect worker start --pool NAME`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ernie_batch.scale.coordinator import deployment_name

HEARTBEAT_S = 30  # the smallest heartbeat Prefect accepts


@dataclass(frozen=True)
class Deployed:
    pool: str
    pool_created: bool
    deployment: str
    deployment_id: str


def deploy_pool(pool: str) -> Deployed:
    """Create the process pool if missing and the shard flow's deployment on it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectNotFound

    from flows.shard import shard

    created = False
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            created = True
    deployment = shard.to_deployment(
        name=pool, entrypoint_type=EntrypointType.MODULE_PATH, tags=["ernie-batch"],
        description="ernie-batch shard runs: submitted by a coordinator (run/backfill --pool)",
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}})
    deployment_id = deployment.apply(work_pool_name=pool)
    return Deployed(pool, created, deployment_name(pool), str(deployment_id))
