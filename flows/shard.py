"""The shard flow: one shard of a coordinator's run, as a worker of the pool runs it.

Its parameters name the manifest under the output folder and the attempt's run id; the
documents, the config and the overrides are in the manifest, the key in the worker's
environment (or a Secret block): nothing bulky or secret is a Prefect parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from ernie_batch.scale.shard import run_shard


@flow(name="ernie-shard", log_prints=False)
async def shard(manifest: str, run_id: str) -> dict[str, Any]:
    """Run the manifest's documents as run `run_id`; returns the shard's summary."""
    summary = await run_shard(Path(manifest), run_id)
    return summary.model_dump(mode="json")
