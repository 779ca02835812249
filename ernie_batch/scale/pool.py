"""`ernie-batch deploy`: the process work pool and the shard flow's deployment on a Prefect server.

Idempotent: the pool is created when missing, the deployment created or updated, the
automation created when missing. The deployment's entrypoint is a module path
(`flows.shard.shard`), so a worker runs the installed package whatever its working folder;
its environment gets `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` (30 s, the least Prefect accepts),
so its shard runs send heartbeats. A self-hosted server does not act on missing heartbeats
by itself: the automation (Prefect's "detect zombie flows") marks a shard run `Crashed` when
no heartbeat came for `SILENT_S`, and the coordinator then gives its shard to a new attempt.
Workers are Prefect's own, one shard run at a time each (`worker_command`): a worker without
`--limit` takes every shard run it finds, and the first to look takes all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ernie_batch.scale.coordinator import deployment_name

HEARTBEAT_S = 30  # the smallest heartbeat Prefect accepts
SILENT_S = 3 * HEARTBEAT_S  # no heartbeat for this long: the shard run is crashed
AUTOMATION = "ernie-batch: crash silent shard runs"


def worker_command(pool: str) -> str:
    """How to start a worker of the pool (README "Running on several machines")."""
    return f"prefect worker start --pool {pool} --limit 1"


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
    ensure_zombie_automation()
    return Deployed(pool, created, deployment_name(pool), str(deployment_id))


def ensure_zombie_automation() -> None:
    """Shard runs whose heartbeats stop are marked `Crashed` (created once, by name)."""
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    from ernie_batch.scale.coordinator import SHARD_FLOW

    with get_client(sync_client=True) as client:
        if client.read_automations_by_name(AUTOMATION):
            return
        client.create_automation(AutomationCore(
            name=AUTOMATION,
            description="Mark ernie-batch shard runs Crashed when their heartbeats stop, so the "
                        "coordinator gives their shard to a new attempt.",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                        "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                        "prefect.flow-run.Crashed"},
                match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
                match_related=ResourceSpecification({"prefect.resource.role": "flow",
                                                     "prefect.resource.name": SHARD_FLOW}),
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=SILENT_S),
            ),
            actions=[ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {SILENT_S} s: its worker is gone or cut off")],
        ))
