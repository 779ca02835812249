"""Shard runs on a Prefect work pool, under one rate limit shared by every worker.

A coordinator (in the calling process) discovers the selection, splits it by content into
shards, writes each shard's manifest into the output (`OUTPUT/_scale/<coordinator>/`, a
file or an object: its documents, object URLs with their ETags; the job's config as data,
its template and schema as text; never a path of the coordinator's machine, never a
secret), and submits one run of the shard flow per shard to the pool with
`run_deployment`. Workers share only the Prefect server and the object store with it.
Workers (Prefect's own `prefect worker start --pool NAME --limit 1`) run the shard flows;
each is an ordinary `Pipeline` over its documents, pacing its own request budget.

The rate limit goes through the Prefect server, not through the coordinator: every shard
run (and every single run on a shared server: configured, or the home's) is a member of its
key's limit, with a share by demand that it lowers at once and raises only after a check,
and a hand-over that lets the others take a leaver's share and count its tail at once
(`shares`, `limit_share`). The coordinator sends nothing. A stop travels through Prefect too
(`stop`): a Variable the shard runs watch, their own flow runs' states, and cancellation on
Ctrl-C.

Modules: `plan` (shards, manifests, the plan), `shares` (the sharing rules, pure),
`limit_share` (membership through Prefect Variables), `stop`, `shard` (a shard run),
`coordinator` (the run), `outcome` (what it came to), `pool` (`deploy`).
"""
