"""The `X-Client-Request-Id` builder against the vendor's rule (1-128 of `A-Z a-z 0-9 . _ : -`;
anything else is dropped silently, so a bad id costs every correlation without an error)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from ernie_batch.api import request_ids
from ernie_batch.store import new_run_id

# the rule as the vendor states it (shared/API-FACTS.md), written out here on purpose
RULE = re.compile(r"\A[A-Za-z0-9._:\-]{1,128}\Z")

any_text = st.text(min_size=0, max_size=300)
attempts = st.integers(min_value=1, max_value=32767)  # attempts.attempt is int16
run_ids = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2999, 1, 1)).map(
    lambda d: new_run_id(d.replace(tzinfo=UTC)))
keys = st.binary(min_size=32, max_size=32).map(bytes.hex)  # what prompt.unit_key gives


@given(any_text, any_text, attempts)
def test_every_id_follows_the_vendor_rule_whatever_it_is_built_from(run_id, key, attempt):
    assert RULE.match(request_ids.build(run_id, key, attempt))


@given(run_ids, keys, attempts)
def test_ids_of_real_runs_read_back_to_their_run_key_and_attempt(run_id, key, attempt):
    value = request_ids.build(run_id, key, attempt)
    assert RULE.match(value)
    assert request_ids.parse(value) == request_ids.RequestRef(run_id, key, attempt)
    assert request_ids.run_part(run_id) == run_id


@given(st.tuples(any_text, any_text, attempts), st.tuples(any_text, any_text, attempts))
def test_different_attempts_never_share_an_id(a, b):
    if a != b:
        assert request_ids.build(*a) != request_ids.build(*b)


@given(any_text)
def test_parse_never_claims_a_foreign_value_it_cannot_have_built(value):
    ref = request_ids.parse(value)
    if ref is not None:  # only a value of the builder's own shape
        assert value == f"eb:{ref.run_id}:{ref.key}:{ref.attempt}"


def test_a_foreign_or_missing_id_is_not_ours():
    assert request_ids.parse(None) is None
    assert request_ids.parse("customer-42") is None
    assert request_ids.parse("eb:run:key:x") is None
    assert request_ids.parse("eb:run:key:01") is None  # the builder writes no leading zero
