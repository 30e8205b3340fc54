"""Revocations as a request sees them: a 401 after authentication, for a while or for good."""

from __future__ import annotations

import time

import pytest

from proxy.errors import Unauthorized
from proxy.identity import Identity
from proxy.state import Revocation, Revocations

KEY = Identity(method="api_key", subject="ci-bot", credential_id="ci-bot")
TOKEN = Identity(method="jwt", subject="alice", issuer="https://idp", token_id="jti-1")


def test_nothing_revoked_means_the_check_is_skipped_and_passes() -> None:
    revocations = Revocations()
    assert not revocations.active
    revocations.check(KEY)
    revocations.check(TOKEN)


def test_a_revoked_key_id_is_refused_with_401_and_others_pass() -> None:
    seen: list[Revocation] = []
    revocations = Revocations(on_revoked=seen.append)
    revocations.apply(Revocation("key", "ci-bot"))
    assert revocations.active and seen == [Revocation("key", "ci-bot")]
    with pytest.raises(Unauthorized) as info:
        revocations.check(KEY)
    assert info.value.details["reason"] == "revoked"
    assert "WWW-Authenticate" not in info.value.headers  # an API key gets no Bearer challenge
    revocations.check(Identity(method="api_key", subject="other", credential_id="other"))
    revocations.check(TOKEN)


def test_a_revoked_jti_is_refused_with_a_bearer_challenge_until_its_time() -> None:
    revocations = Revocations()
    revocations.apply(Revocation("jti", "jti-1", until=time.time() + 0.2))
    with pytest.raises(Unauthorized) as info:
        revocations.check(TOKEN)
    assert info.value.headers["WWW-Authenticate"].startswith("Bearer ")
    time.sleep(0.25)
    revocations.check(TOKEN)
    assert not revocations.active


def test_hearing_a_revocation_again_ends_nothing_twice_and_a_past_one_is_ignored() -> None:
    seen: list[Revocation] = []
    revocations = Revocations(on_revoked=seen.append)
    revocations.apply(Revocation("key", "k"))
    revocations.apply(Revocation("key", "k"))
    revocations.apply(Revocation("jti", "old", until=time.time() - 1))
    assert seen == [Revocation("key", "k")] and len(revocations) == 1


def test_revocations_travel_as_json_and_garbage_is_refused() -> None:
    r = Revocation("jti", "abc", until=1893456000.0)
    assert Revocation.decode(r.encode()) == r
    for bad in ("{}", "[1]", '{"kind": "x", "value": "a", "until": null}', "not json"):
        with pytest.raises(ValueError):
            Revocation.decode(bad)


def test_a_revocation_whose_until_has_passed_is_refused_not_reported_done() -> None:
    from proxy.admin import parse_revocation

    with pytest.raises(ValueError, match="in the past"):
        parse_revocation({"jti": "tok-1", "until": "2025-11-30T00:00:00Z"})
    assert parse_revocation({"jti": "tok-1", "until": "2999-01-01T00:00:00Z"}).value == "tok-1"
