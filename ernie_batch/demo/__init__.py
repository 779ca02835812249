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
CONFIG_V2 = "demo-v2.toml"  # the second prompt version (prompts/page-v2.txt), for `demo --eval`
SAMPLES = "samples"
LABELS = "labels.jsonl"  # the samples' labels (paths relative to it): `demo --eval`
OUTPUT = Path("data") / "demo-output"  # under the folder the demo runs from
# `demo --eval` answers from the labels' truth: its own folder, so the plain demo's
# generated answers (same fingerprint as demo.toml) are never scored
EVAL_OUTPUT = Path("data") / "demo-eval"
# how often the simulator misreads a field of the truth, by a marker of each prompt version:
# prompts/page.txt says nothing of which date and which total to take, page-v2.txt does
ERROR_RATES = {
    "careful archivist": {"date": 0.4, "total_amount": 0.4, "document_type": 0.2,
                          "line_items": 0.3},  # prompts/page.txt
    "never guess": {"title": 0.1, "line_items": 0.1},  # prompts/page-v2.txt
}


@contextmanager
def demo_home() -> Iterator[Path]:
    """The packaged folder as a real path (pip installs packages as plain folders)."""
    with as_file(files(__name__)) as home:
        yield Path(home)
