"""Benchmark scenarios: each module exposes `run(scale: float = 1.0) -> dict`."""
