"""The README as a newcomer reads it: every file it names exists and does what it says."""

from __future__ import annotations

import re

from ernie_batch.answers.prompt import fingerprint
from ernie_batch.config import load_config
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


def test_the_cli_reference_names_every_option_of_every_command() -> None:
    import typer

    from ernie_batch.cli import app

    section = README.split("## CLI reference", 1)[1].split("\n## ", 1)[0]
    blocks = [line for line in section.splitlines() if line.startswith("|")]
    blocks += [b for b in section.split("\n\n") if not b.startswith("|")]
    for name, command in typer.main.get_command(app).commands.items():
        text = " ".join(b for b in blocks if f"`ernie-batch {name} " in b or f"`{name}`" in b)
        assert text, f"the CLI reference has no row for {name}"
        for param in command.params:
            if param.param_type_name != "option" or "--help" in param.opts:
                continue
            named = any(re.search(rf"(?<![\w-]){re.escape(opt)}\b", text) for opt in param.opts)
            assert named, f"the CLI reference misses `{name} {max(param.opts, key=len)}`"


def test_the_readme_names_the_tests_that_skip_without_shared() -> None:
    shared = re.compile(r"skipif\(\s*not \(?(CORPUS|VENDOR|SPEC)\b")  # all beside ../shared
    skipping = [p for p in sorted((PROJECT / "tests").glob("test_*.py"))
                if shared.search(p.read_text())]
    assert skipping
    for path in skipping:
        assert f"tests/{path.name}" in README, f"README does not say why {path.name} may skip"
