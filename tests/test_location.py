"""Locations a user names (paths or s3:// URLs) and the storage options that reach a bucket."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from ernie_batch.buckets import check_options, resolve_access
from ernie_batch.config import load_config
from ernie_batch.errors import ConfigError
from ernie_batch.location import Location
from tests.conftest import S3_SECRET


def test_an_s3_url_is_bucket_and_key_and_never_a_folder() -> None:
    loc = Location.parse("s3://scans/inbox/2026/")
    assert (loc.scheme, loc.bucket, loc.key, loc.is_remote) == ("s3", "scans", "inbox/2026", True)
    assert str(loc) == "s3://scans/inbox/2026" == str(Location.parse("s3://scans/inbox/2026"))
    assert str(loc.join("a b.pdf")) == "s3://scans/inbox/2026/a b.pdf" == str(loc / "a b.pdf")
    assert loc.join("x/y.png").relative_to(loc) == "x/y.png"
    assert (loc.join("y.png").name, loc.join("y.png").stem, loc.parent.key) == ("y.png", "y", "inbox")
    assert str(Location.parse("s3://scans")) == "s3://scans"
    with pytest.raises(TypeError, match="object storage"):
        Path(loc)  # what pathlib would make of it: s3:/scans/inbox/2026, a local folder
    with pytest.raises(ValueError, match="is not under"):
        loc.relative_to(Location.parse("s3://other/inbox"))


def test_a_local_path_stays_exactly_as_given_and_equals_its_path(tmp_path: Path) -> None:
    loc = Location.parse("data/output")
    assert str(loc) == "data/output" and not loc.is_remote and Path(loc) == Path("data/output")
    assert Location.parse(tmp_path) == tmp_path and {tmp_path: 1}[Location.parse(tmp_path)] == 1
    assert Location.parse(f"file://{tmp_path}") == tmp_path
    assert Location.parse("~/x").absolute() == Path.home() / "x"
    (tmp_path / "pages").mkdir()
    out = Location.parse(tmp_path)  # code that held output.path as a Path keeps working
    assert (out / "pages").is_dir() and [p.name for p in out.glob("p*")] == ["pages"]
    with pytest.raises(AttributeError, match="object storage: it has no 'glob'"):
        Location.parse("s3://scans/out").glob("*")


@pytest.mark.parametrize("bad, says", [("http://host/x", "unsupported URL scheme"),
                                       ("s3:///key", "no bucket"), ("", "empty")])
def test_what_is_not_a_location_is_one_line(bad: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Location.parse(bad)


def test_config_fields_take_urls_beside_paths() -> None:
    cfg = load_config(None, {"sources.paths": ["s3://scans/inbox/", "data/inbox"],
                             "output.storage_options": {"AWS_REGION": "eu-west-1",
                                                        "AWS_SECRET_ACCESS_KEY": "env:MY_SECRET",
                                                        "aws_allow_http": True}})
    assert [str(p) for p in cfg.sources.paths] == ["s3://scans/inbox", "data/inbox"]
    assert cfg.model_dump(mode="json")["sources"]["paths"] == ["s3://scans/inbox", "data/inbox"]
    assert cfg.output.storage_options["aws_allow_http"] == "true"
    assert cfg.sources.storage_options == cfg.output.storage_options  # sources use the output's


def test_an_output_url_is_a_root_on_the_bucket_with_its_state_on_this_machine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MY_KEY_ID", "key-id")
    monkeypatch.setenv("MY_SECRET", S3_SECRET)
    options = {"AWS_ACCESS_KEY_ID": "env:MY_KEY_ID", "AWS_SECRET_ACCESS_KEY": "env:MY_SECRET",
               "AWS_REGION": "eu-west-1"}
    root = load_config(None, {"output.path": "s3://scans/out/",
                              "output.storage_options": options}).output.root()
    assert (root.url, root.table_uri("pages")) == ("s3://scans/out", "s3://scans/out/pages")
    assert root.storage_options["aws_secret_access_key"] == S3_SECRET  # for delta-rs only
    assert S3_SECRET not in repr(root) + str(root)
    state = root.journal_dir  # journals and run-id locks: local, one folder per output URL
    assert state.parent == tmp_path / "cache" / "ernie-batch" / "state"
    assert state.name.startswith("scans-")
    other = load_config(None, {"output.path": "s3://scans/elsewhere"}).output.root()
    assert other.journal_dir != state
    chosen = load_config(None, {"output.path": "s3://scans/out", "output.state_dir":
                                str(tmp_path / "state")}).output.root()
    assert chosen.journal_dir == tmp_path / "state"
    local = load_config(None, {"output.path": str(tmp_path / "o")}).output.root()
    assert local.journal_dir == tmp_path / "o" / "_journal" and local.storage_options is None
    with pytest.raises(ConfigError, match="MY_UNSET is not set"):
        load_config(None, {"output.path": "s3://scans/out", "output.storage_options":
                           {"AWS_SECRET_ACCESS_KEY": "env:MY_UNSET"}}).output.root()


def test_a_literal_secret_in_a_config_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    config = tmp_path / "job.toml"
    config.write_text('[output]\npath = "out"\n[output.storage_options]\n'
                      'AWS_SECRET_ACCESS_KEY = "wJalrXUtnFEMI-LITERAL"\n')
    with pytest.raises(ConfigError) as err:
        load_config(config)
    message = str(err.value)
    assert "output.storage_options" in message and "env:NAME" in message
    assert "LITERAL" not in message and "\n" not in message
    for secret in ("aws_session_token", "azure_storage_account_key", "google_service_account_key",
                   "AWS_ACCESS_KEY_ID"):
        with pytest.raises(ValueError, match="never written in a config file"):
            check_options({secret: "x"})
    assert check_options({"AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/token"})  # a path, no secret


def test_unsafe_rename_is_refused_in_options_and_environment() -> None:
    with pytest.raises(ValueError, match="unsafe rename is refused"):
        check_options({"AWS_S3_ALLOW_UNSAFE_RENAME": True})
    with pytest.raises(ValueError, match="etag"):
        check_options({"aws_conditional_put": "disabled"})
    with pytest.raises(ConfigError, match="unsafe rename is refused"):
        resolve_access({}, {"AWS_S3_ALLOW_UNSAFE_RENAME": "true"})


def test_storage_options_name_variables_and_secrets_never_print() -> None:
    env = {"AWS_ACCESS_KEY_ID": "id-from-env", "AWS_SECRET_ACCESS_KEY": "overridden",
           "MY_SECRET": S3_SECRET, "AWS_REGION": "us-east-1"}
    access = resolve_access({"AWS_SECRET_ACCESS_KEY": "env:MY_SECRET",
                             "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, env)
    assert access.config()["aws_secret_access_key"] == S3_SECRET  # the option beats the env
    assert access.config()["aws_region"] == "us-east-1"
    assert dict(access.settings)["aws_endpoint_url"] == "http://127.0.0.1:9"
    for shown in (repr(access), str(access), repr(access.secrets)):
        assert S3_SECRET not in shown and "id-from-env" not in shown
    assert pickle.loads(pickle.dumps(access)) == access  # what a prepare worker is handed
    with pytest.raises(ConfigError, match="environment variable NOT_SET is not set"):
        resolve_access({"AWS_SECRET_ACCESS_KEY": "env:NOT_SET"}, {})


def test_state_folder_is_per_output_url_unless_configured(tmp_path: Path) -> None:
    from ernie_batch.config import OutputOptions

    remote = OutputOptions(path="s3://scans/out")
    other = OutputOptions(path="s3://scans/out2")
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert remote.state_folder(env).parent == tmp_path / "ernie-batch" / "state"
    assert remote.state_folder(env).name.startswith("scans-")
    assert remote.state_folder(env) != other.state_folder(env)
    assert OutputOptions(path="s3://scans/out", state_dir=tmp_path / "st").state_folder() == (
        tmp_path / "st")
    assert OutputOptions(path=str(tmp_path / "o")).state_folder() == tmp_path / "o" / "_journal"
