"""Prefect flows: thin orchestration over `ernie_batch.run.engine`."""
