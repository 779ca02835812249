"""Prefect flows: thin orchestration over `ernie_batch.engine`."""
