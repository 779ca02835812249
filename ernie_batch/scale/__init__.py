"""Shard runs on a Prefect work pool, under one rate limit shared by every worker.

A coordinator (in the calling process) discovers the selection, splits it by content into
shards, writes each shard's documents to a manifest under `OUTPUT/_scale/<coordinator>/`,
and submits one run of the shard flow per shard to the pool with `run_deployment`. Workers
(Prefect's own `prefect worker start`) run the shard flows; each is an ordinary `Pipeline`
over its documents, its budget asking the coordinator for every request it sends.

The rate limit has one owner, the coordinator: it paces *grants* with the same request
budget a single run uses, hands them to shards that have requests waiting, and lowers the
rate on any shard's 429. The channel is a pair of small files per shard under the same
folder (`channel`); grants unused within a fraction of a second expire, so a late or
stalled shard can never send a burst that a window did not allow.

Modules: `channel` (the files), `granter` (the coordinator's side of the limit),
`shared_budget` (a shard's side), `plan` (shards and manifests), `coordinator` (the run).
"""
