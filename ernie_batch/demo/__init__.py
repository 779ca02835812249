"""The demo's one packaged home: sample documents, the simulator config, prompts and schema.

They live inside the package (declared as package data) so that `ernie-batch demo` works from
any install, editable or not, run from any folder: nothing is looked up beside a source tree.
The copies under the repository's `configs/` are the ones users edit; a test keeps them
identical to these.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import as_file, files
from pathlib import Path

CONFIG = "demo.toml"
SAMPLES = "samples"
OUTPUT = Path("data") / "demo-output"  # under the folder the demo runs from


@contextmanager
def demo_home() -> Iterator[Path]:
    """The packaged folder as a real path (pip installs packages as plain folders)."""
    with as_file(files(__name__)) as home:
        yield Path(home)
