"""`ernie-batch`: the command line (typer + rich), one module per group of commands.

Prefect, pandas and the engine are imported inside the commands: `import prefect` alone
costs seconds, and `ernie-batch --help` should answer at once.
"""

from __future__ import annotations

import sys

from ernie_batch.cli import (  # noqa: F401 - each registers its commands
    documents,
    evaluate,
    info,
    maintenance,
    reconcile,
    review,
    run,
    scale,
    service,
)
from ernie_batch.cli.common import app, console
from ernie_batch.vocab import ExitCode

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(ExitCode.SIGINT)
