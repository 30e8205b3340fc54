"""Where credentials come from, and what is left of the query string."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.auth.extractor import Credentials, Extractor
from proxy.auth.registry import locators
from proxy.config import AuthSettings

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"


def ex(**auth: object) -> Extractor:
    return Extractor(locators(AuthSettings.model_validate(auth)))


def get(
    headers: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
    *,
    websocket: bool = False,
    **auth: object,
) -> Credentials:
    return ex(**auth).extract(headers or [], query, websocket=websocket)


def test_bearer_from_the_authorization_header() -> None:
    for value in (
        b"Bearer " + TOKEN.encode(),
        b"bearer  " + TOKEN.encode(),
        b"BEARER\t" + TOKEN.encode() + b" ",
    ):
        c = get([(b"authorization", value)])
        assert (c.bearer, c.bearer_source, c.problem) == (TOKEN, "header", None)


def test_a_non_bearer_scheme_is_a_note_not_a_credential() -> None:
    c = get([(b"authorization", b"Basic dXNlcjpwYXNz")])
    assert c.bearer is None and c.bearer_problem is None
    assert c.problem == "Authorization header is not a Bearer token"


@pytest.mark.parametrize(
    "value",
    [b"Bearer", b"Bearer ", b"Bearer a b", b"Bearer a,b", b"Bearer tok\x00en", b"Bearer \xe9t\xe9"],
)
def test_an_empty_or_malformed_bearer_is_a_problem(value: bytes) -> None:
    c = get([(b"authorization", value)])
    assert c.bearer is None and c.bearer_problem is not None and c.problem == c.bearer_problem


def test_two_different_authorization_headers_are_ambiguous() -> None:
    c = get([(b"authorization", b"Bearer aaa"), (b"authorization", b"Bearer bbb")])
    assert c.bearer is None and c.bearer_problem == "two bearer tokens (header, header)"


def test_rest_ignores_query_tokens_but_still_strips_them() -> None:
    c = get([], b"a=1&token=" + TOKEN.encode() + b"&access_token=x&api_key=k&b=2")
    assert c.bearer is None and c.api_key is None and c.problem is None
    assert c.clean_query == b"a=1&b=2"


@pytest.mark.parametrize("param", [b"token", b"access_token", b"%74oken", b"access%5Ftoken"])
def test_websocket_takes_the_token_from_the_query(param: bytes) -> None:
    c = get([], b"x=%2F&" + param + b"=" + TOKEN.encode() + b"&y", websocket=True)
    assert (c.bearer, c.bearer_source) == (TOKEN, "query")
    assert c.clean_query == b"x=%2F&y"


def test_credential_lookalikes_are_dropped_from_the_query_but_are_not_credentials() -> None:
    c = get([], b"a=1&TOKEN=x&token%5B%5D=y&Access_Token=z&API_KEY=k&keep=2", websocket=True)
    assert c.clean_query == b"a=1&keep=2"
    assert c.bearer is None and c.api_key is None


def test_clean_query_keeps_every_other_byte_exactly() -> None:
    raw = b"q=a+b%20c&&empty=&token=abc&x=%ZZ&;odd=1&dup=1&dup=2&api_key=k&z"
    c = get([], raw, websocket=True)
    assert c.clean_query == b"q=a+b%20c&&empty=&x=%ZZ&;odd=1&dup=1&dup=2&z"
    assert get([], b"only=1").clean_query == b"only=1"
    assert get([], b"token=abc").clean_query == b""
    assert get([], b"").clean_query == b""


def test_websocket_cookie_is_used_only_when_configured_and_nothing_explicit() -> None:
    headers = [(b"cookie", b"theme=dark; at=" + TOKEN.encode() + b"; other=1")]
    assert get(headers, websocket=True).bearer is None
    c = get(headers, websocket=True, token_cookie="at")
    assert (c.bearer, c.bearer_source) == (TOKEN, "cookie")
    assert get(headers, websocket=False, token_cookie="at").bearer is None
    # An explicit token wins over the ambient cookie, without ambiguity.
    c = get(headers, b"token=zzz", websocket=True, token_cookie="at")
    assert (c.bearer, c.bearer_source, c.problem) == ("zzz", "query", None)


def test_subprotocol_bearer_entries_are_used_and_removed() -> None:
    k8s = base64.urlsafe_b64encode(TOKEN.encode()).rstrip(b"=")
    for entry in (b"bearer." + TOKEN.encode(), b"base64url.bearer.authorization.k8s.io." + k8s):
        c = get(
            [(b"sec-websocket-protocol", b"chat.v1, " + entry + b", graphql-ws")], websocket=True
        )
        assert (c.bearer, c.bearer_source) == (TOKEN, "subprotocol")
        assert c.subprotocols == ("chat.v1", "graphql-ws")
    assert get([(b"sec-websocket-protocol", b"chat.v1, bearer.x")]).subprotocols == ()


def test_a_malformed_k8s_subprotocol_is_a_problem() -> None:
    c = get(
        [(b"sec-websocket-protocol", b"base64url.bearer.authorization.k8s.io.!!!")], websocket=True
    )
    assert c.bearer is None and c.bearer_problem is not None


def test_two_different_websocket_tokens_are_refused_the_same_one_twice_is_fine() -> None:
    headers = [(b"authorization", b"Bearer aaa"), (b"sec-websocket-protocol", b"bearer.bbb")]
    c = get(headers, websocket=True)
    assert c.bearer is None and c.bearer_problem == "two bearer tokens (header, subprotocol)"
    c = get([(b"authorization", b"Bearer aaa")], b"token=aaa", websocket=True)
    assert (c.bearer, c.bearer_source, c.problem) == ("aaa", "header", None)


def test_api_key_from_the_configured_header_and_websocket_query() -> None:
    c = get([(b"x-token", b"ak_123")], api_keys={"header": "X-Token"})
    assert (c.api_key, c.api_key_source) == ("ak_123", "header")
    assert get([(b"x-api-key", b"ak_123")], api_keys={"header": "X-Token"}).api_key is None
    c = get([], b"api_key=ak_%31", websocket=True)
    assert (c.api_key, c.api_key_source) == ("ak_1", "query")
    c = get([(b"x-api-key", b"ak_1")], b"api_key=ak_2", websocket=True)
    assert c.api_key is None and c.api_key_problem == "two API keys (header, query)"
    c = get([(b"x-api-key", b"")])
    assert c.api_key is None and c.api_key_problem == "empty API key"


def test_credentials_never_show_in_repr() -> None:
    c = get([(b"authorization", b"Bearer " + TOKEN.encode()), (b"x-api-key", b"ak_secret")])
    assert TOKEN not in repr(c) and "ak_secret" not in repr(c)


@pytest.mark.parametrize(
    ("query", "clean"),
    [
        (b"a=1;access_token=" + TOKEN.encode(), b"a=1"),
        (b"a=1;token=t&b=2", b"a=1&b=2"),
        (b"b=2&a=1;x=2;api_key=k", b"b=2&a=1;x=2"),
        (b"a=1;%74oken=t", b"a=1"),
        (b"a=1;Access_Token=t", b"a=1"),
        (b"a=1;token[]=t", b"a=1"),
        (b"a=1;token", b"a=1"),
    ],
)
def test_a_credential_name_after_a_semicolon_is_a_refusal_and_stays_out_of_the_clean_query(
    query: bytes, clean: bytes
) -> None:
    for websocket in (False, True):
        c = get([], query, websocket=websocket)
        assert c.query_refusal is not None
        assert c.bearer is None and c.api_key is None
        assert c.clean_query == clean


def test_semicolons_without_a_credential_name_change_nothing() -> None:
    for query in (b"a=1;b=2", b"tokenize=1;x", b"x=token;y", b"token=" + TOKEN.encode() + b";"):
        c = get([], query)
        assert c.query_refusal is None
    assert get([], b"a=1;b=2&c").clean_query == b"a=1;b=2&c"


@given(st.text(st.sampled_from(list(" \t\n=a.é")), max_size=10))
def test_the_usual_bearer_form_reads_as_any_other_spelling_of_the_scheme(rest: str) -> None:
    # "Bearer " is read without the Authorization grammar's regular expression; "bearer " with
    # it: both must find the same credential or the same problem.
    usual = get([(b"authorization", b"Bearer " + rest.encode("latin-1"))])
    other = get([(b"authorization", b"bearer " + rest.encode("latin-1"))])
    assert (usual.bearer, usual.bearer_source, usual.problem) == (
        other.bearer,
        other.bearer_source,
        other.problem,
    )
