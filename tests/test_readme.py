"""The README as a newcomer reads it: every file it names exists and does what it says."""

from __future__ import annotations

import re

from ernie_batch.config import load_config
from ernie_batch.prompt import fingerprint
from tests.conftest import PROJECT

README = (PROJECT / "README.md").read_text()


def test_every_configs_path_the_readme_names_exists() -> None:
    named = set(re.findall(r"configs/[\w./*-]+\w", README))
    assert "configs/prompts/page-v2.txt" in named
    for path in named:
        assert list(PROJECT.glob(path)), f"README names {path}, which does not exist"


def test_the_backfill_examples_second_prompt_is_a_new_version_of_the_first() -> None:
    default = PROJECT / "configs" / "default.toml"
    v1 = load_config(default)
    v2 = load_config(default, {"prompt.template_file": str(PROJECT / "configs/prompts/page-v2.txt")})
    assert v2.resolved.template != v1.resolved.template
    assert v2.resolved.schema == v1.resolved.schema
    assert fingerprint(v2) != fingerprint(v1)  # every page in range is sent again
