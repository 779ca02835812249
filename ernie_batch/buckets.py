"""Object-store access: the settings and credentials a client gets, and never a secret in a file.

Two sources, the later winning: the standard environment (`ENV_NAMES`: `AWS_ENDPOINT_URL`,
`AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_ALLOW_HTTP`, `AWS_PROFILE`, ...) and a config's `storage_options` (keys as delta-rs
and the object-store client spell them, e.g. `AWS_ENDPOINT_URL` or `aws_region`). A value
in the file is either a plain setting or `"env:NAME"`, read from the environment when a
run starts; a secret (a key whose name says secret, token, password, access key, ...)
written literally is refused when the config loads, and so is every option that gives up
conditional writes (unsafe rename), which leases and Delta commits rely on.

`ObjectAccess` carries what a client needs, to this process's stores and to the prepare
workers (by pickle: a forkserver's environment may be older than the run's), with its
secrets as `SecretStr` and its repr naming them only.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from ernie_batch.errors import ConfigError

ENV_REF = "env:"
# the environment a client reads (and a worker is handed): endpoint, region, credentials,
# plain HTTP, and the variables of container and web-identity credentials
ENV_NAMES = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ALLOW_HTTP",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "AWS_SKIP_SIGNATURE", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
_SECRET_WORDS = ("secret", "token", "password", "access_key", "account_key", "sas",
                 "credential", "private_key", "service_account_key")
_NOT_SECRET_ENDINGS = ("_file", "_uri", "_path", "_endpoint", "_url")
_UNSAFE = "s3_allow_unsafe_rename"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TRUE = ("1", "true", "yes", "on")


def _bare(key: str) -> str:
    """A key as this module reasons about it: lower case, without the `aws_` prefix."""
    key = key.strip().lower()
    return key[4:] if key.startswith("aws_") else key


def is_secret(key: str) -> bool:
    bare = _bare(key)
    return (any(w in bare for w in _SECRET_WORDS)
            and not bare.endswith(_NOT_SECRET_ENDINGS)) or bare == "key_id"


def check_options(options: Mapping[str, Any]) -> dict[str, str]:
    """A config's storage options as strings; ValueError (one line, never the value) for a
    literal secret, a malformed `env:` reference, or an option that gives up conditional writes."""
    checked: dict[str, str] = {}
    for key, raw in options.items():
        value = str(raw).lower() if isinstance(raw, bool) else str(raw)
        ref = value.startswith(ENV_REF)
        if ref and not _ENV_NAME.match(value[len(ENV_REF):]):
            raise ValueError(f"{key}: {value!r} is not env:NAME with NAME an environment variable")
        if is_secret(key) and not ref:
            raise ValueError(f"{key}: a secret is never written in a config file; give "
                             f"\"env:NAME\" and set NAME in the environment")
        _check_safe(key, value if not ref else "", "storage option")
        checked[key] = value
    return checked


def _check_safe(key: str, value: str, what: str) -> None:
    bare = _bare(key)
    if bare == _UNSAFE and value.strip().lower() in _TRUE:
        raise ValueError(f"{what} {key}: unsafe rename is refused (leases and commits on object "
                         "storage need conditional writes)")
    if bare == "conditional_put" and value and value.strip().lower() != "etag":
        raise ValueError(f"{what} {key}: only \"etag\" (If-Match / If-None-Match) is accepted")


@dataclass(frozen=True)
class ObjectAccess:
    """What a client of one object store needs: settings, and secrets that never print."""

    settings: tuple[tuple[str, str], ...] = ()
    secrets: tuple[tuple[str, SecretStr], ...] = field(default=(), repr=False)

    def __repr__(self) -> str:
        names = ", ".join(k for k, _ in self.secrets)
        return f"ObjectAccess(settings={dict(self.settings)!r}, secrets=[{names}])"

    def config(self) -> dict[str, str]:
        """Every setting with its secret values revealed: for a client's constructor only."""
        return {**dict(self.settings), **{k: v.get_secret_value() for k, v in self.secrets}}


def resolve_access(options: Mapping[str, str] | None = None,
                   environ: Mapping[str, str] | None = None) -> ObjectAccess:
    """The environment's settings overlaid with `options` (its `env:` references read now).

    A profile (`AWS_PROFILE`, or a `profile` option) with no access key given is turned into
    the profile's credentials through boto3. ConfigError (one line) for a reference to an
    unset variable, or an unsafe option in the environment.
    """
    env = os.environ if environ is None else environ
    for name in ("AWS_S3_ALLOW_UNSAFE_RENAME", "AWS_CONDITIONAL_PUT"):
        try:
            _check_safe(name, env.get(name, ""), "environment variable")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    merged: dict[str, str] = {name.lower(): env[name] for name in ENV_NAMES if env.get(name)}
    for key, value in (options or {}).items():
        if value.startswith(ENV_REF):
            name = value[len(ENV_REF):]
            if name not in env:
                raise ConfigError(f"storage_options.{key}: the environment variable {name} "
                                  "is not set")
            value = env[name]
        merged[key.lower()] = value
    profile = merged.pop("aws_profile", None) or merged.pop("profile", None) or env.get(
        "AWS_PROFILE")
    if profile and not any(_bare(k) == "access_key_id" for k in merged):
        merged.update(_profile_credentials(profile))
    return ObjectAccess(
        settings=tuple(sorted((k, v) for k, v in merged.items() if not is_secret(k))),
        secrets=tuple(sorted((k, SecretStr(v)) for k, v in merged.items() if is_secret(k))))


def _profile_credentials(profile: str) -> dict[str, str]:
    """A named profile's credentials (and region) as a client's settings, via boto3."""
    try:
        import boto3
    except ImportError:
        raise ConfigError(f"profile {profile!r}: reading AWS profiles needs boto3 (pip install "
                          "'ernie-batch[s3-profiles]'), or set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY") from None
    try:
        session = boto3.Session(profile_name=profile)
        creds = session.get_credentials()
    except Exception as exc:  # noqa: BLE001 - any failure is one line, never the secret
        raise ConfigError(f"profile {profile!r}: {type(exc).__name__}") from None
    if creds is None:
        raise ConfigError(f"profile {profile!r}: no credentials found")
    frozen = creds.get_frozen_credentials()
    out = {"aws_access_key_id": frozen.access_key, "aws_secret_access_key": frozen.secret_key}
    if frozen.token:
        out["aws_session_token"] = frozen.token
    if session.region_name:
        out["aws_region"] = session.region_name
    return out


_PREFIXES = {"s3": "aws_", "gs": "google_", "az": "azure_"}  # a key of another store is left out
# settings of the HTTP client rather than the store (obstore takes them apart, unprefixed)
_CLIENT_KEYS = frozenset({
    "allow_http", "allow_invalid_certificates", "connect_timeout", "default_content_type",
    "http1_only", "http2_keep_alive_interval", "http2_keep_alive_timeout",
    "http2_keep_alive_while_idle", "http2_only", "pool_idle_timeout", "pool_max_idle_per_host",
    "proxy_url", "proxy_ca_certificate", "proxy_excludes", "randomize_addresses",
    "read_timeout", "timeout", "user_agent"})


def _split(config: dict[str, str], scheme: str) -> tuple[dict[str, str], dict[str, str]]:
    """(store settings, client settings) for a store of `scheme`; other stores' keys dropped."""
    own = _PREFIXES.get(scheme, "")
    foreign = tuple(p for s, p in _PREFIXES.items() if s != scheme)
    store: dict[str, str] = {}
    http: dict[str, str] = {}
    for key, value in config.items():
        if key.startswith(foreign):
            continue
        bare = key[len(own):] if own and key.startswith(own) else key
        if bare in _CLIENT_KEYS:
            http[bare] = value
        else:
            store[key] = value
    return store, http


@functools.lru_cache(maxsize=16)
def client(access: ObjectAccess, scheme: str, bucket: str) -> Any:
    """An obstore client of one bucket (one per process and bucket, kept: it pools connections)."""
    from obstore.exceptions import BaseError
    from obstore.store import from_url

    store, http = _split(access.config(), scheme)
    try:
        return from_url(f"{scheme}://{bucket}", config=store, client_options=http or None)
    except BaseError as exc:  # e.g. an option the client does not know: its name, not values
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{scheme}://{bucket}: cannot set up the object-store client: "
                          f"{first}") from None
