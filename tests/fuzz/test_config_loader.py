"""The config loader, fuzzed: TOML-shaped documents built from the settings' own schema (every
section, key and nested table, with values of the right type, the wrong type and the tricky kind:
origins over public suffixes, CIDRs with host bits, methods that are typos, "yes" for a boolean),
plus environment overrides.

Every document becomes Settings (and an App that builds) or a ConfigError whose message is one
line naming a key that exists in what was given; nothing else is ever raised.
"""

from __future__ import annotations

import datetime
import types
import typing
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from proxy import config
from proxy.app import App
from proxy.errors import ConfigError

TRICKY_STRINGS = [
    "", " ", "public", "jwt", "api_key", "jtw", "*", "/*", "/api/*", "/a*b", "api/*", "/ws",
    "GET", "GTE", "get", "OPTIONS", "X-API-Key", "x auth", "X-Auth-Subject", "Authorization",
    "RS256", "HS256", "none", "EdDSA", "models:read", "bad scope", "yes", "true", "auto",
    "http://127.0.0.1:9000", "https://idp.test", "ftp://x", "http://", "http://u:p@h/?q#f",
    "https://*.example.com", "https://*.com", "https://*.co.uk", "https://*.github.io", "null",
    "http://localhost:5173", "https://a.*.com", "https://*.*.example.com", "*.example.com",
    "10.0.0.0/8", "10.1.2.3/8", "::1/128", "fe80::1/64", "300.0.0.0/8", "127.0.0.1:8000",
    "[::1]:8001", "localhost", ":80", "127.0.0.1:99999", "debug", "info", "loud",
    "2027-01-01T00:00:00Z", "2027-01-01T00:00:00", "not a date", "0" * 64, "g" * 64,
    "AUTHPROXY_FUZZ_UNSET", "ü", "\u00a0", "a\x00b", "a\nb", "${HOME}",
]  # fmt: skip

scalars = st.one_of(
    st.sampled_from(TRICKY_STRINGS),
    st.text(max_size=16),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 5, 65536, 10**20]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.datetimes(timezones=st.none() | st.just(datetime.UTC)),
    st.dates(),
)
# Table keys without control characters: a key with one is printed raw in the error (see
# test_an_unknown_key_with_a_control_character_is_named_on_one_line), which would hide whatever
# else this finds.
keys = st.text(st.characters(blacklist_categories=("Cc",)), max_size=8)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=5,
)


def for_annotation(annotation: Any, depth: int) -> st.SearchStrategy[Any]:
    """Values of this type, with junk and tricky values mixed in."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return for_annotation(args[0], depth)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(for_annotation(a, depth) for a in args))
    if origin is typing.Literal:
        return st.sampled_from(args) | st.sampled_from(TRICKY_STRINGS)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return tables(annotation, depth + 1) if depth < 4 else junk
    if origin in (tuple, list):
        return st.lists(for_annotation(args[0], depth), max_size=4) | junk
    if origin is dict:
        return st.dictionaries(
            st.sampled_from(TRICKY_STRINGS) | st.text(max_size=8), scalars, max_size=3
        )
    simple: dict[Any, st.SearchStrategy[Any]] = {
        bool: st.booleans(),
        int: st.integers(-5, 100_000),
        float: st.floats(-5, 1e6),
        str: st.sampled_from(TRICKY_STRINGS) | st.text(max_size=16),
        datetime.datetime: st.datetimes(timezones=st.none() | st.just(datetime.UTC)),
        type(None): st.none(),
    }
    typed = simple.get(annotation)
    return junk if typed is None else st.one_of(typed, typed, typed, scalars)


def tables(model: type[BaseModel], depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A table for `model`: a random subset of its keys, sometimes an unknown one."""
    fields = {
        name: for_annotation(field.annotation, depth) for name, field in model.model_fields.items()
    }
    known = st.fixed_dictionaries({}, optional=fields)
    unknown = st.dictionaries(st.sampled_from(["extra", "Listen", "routes "]), scalars, max_size=1)
    return st.tuples(known, unknown).map(lambda t: {**t[0], **t[1]})


documents = tables(config.Settings)

ENV_NAMES = [
    "AUTHPROXY__CORS__MAX_AGE_S", "AUTHPROXY__SERVER__LISTEN", "AUTHPROXY__ROUTES__0__AUTH",
    "AUTHPROXY__ROUTES__9__AUTH", "AUTHPROXY__UPSTREAM__URL", "AUTHPROXY__NOPE",
    "AUTHPROXY____X", "AUTHPROXY__SERVER__LISTEN__DEEPER", "AUTHPROXY__CORS__ALLOW_ORIGINS",
]  # fmt: skip
ENV_VALUES = ["60", "true", '["a"]', '"public"', "[", "https://*.com", "{", "x = 1", ""]
environments = st.dictionaries(st.sampled_from(ENV_NAMES), st.sampled_from(ENV_VALUES), max_size=3)


def check_error(exc: ConfigError, data: dict[str, Any], *extra_keys: str) -> None:
    message = str(exc)
    assert "\n" not in message, message
    assert exc.key and message.startswith(exc.key), message
    assert "Traceback" not in message and "pydantic" not in message.lower(), message
    # The key names something that was given (or the document as a whole).
    given = {*map(str, data), "config", *extra_keys}
    assert any(exc.key == k or exc.key.startswith((k + ".", k + "[")) for k in given), (
        exc.key,
        sorted(given),
    )


DEMO = config.read_toml(Path(__file__).resolve().parents[2] / "config.toml")


def leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a parsed document (tables, array items and values)."""
    out = [path] if path else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += leaves(v, (*path, i))
    return out


def replaced(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = config._deepcopy(node)
    target = copy
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return copy


@st.composite
def demo_mutations(draw: st.DrawFn) -> dict[str, Any]:
    """The demo config.toml with one to three keys given another value (or removed)."""
    data: dict[str, Any] = config._deepcopy(DEMO)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(leaves(data)))
        if draw(st.integers(0, 4)) == 0:
            parent = replaced(data, (), data)
            target = parent
            for part in path[:-1]:
                target = target[part]
            del target[path[-1]]
            data = parent
        else:
            data = replaced(data, path, draw(junk))
    return data


SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(data=st.one_of(documents, demo_mutations()))
def test_any_document_is_settings_or_a_one_line_error_naming_a_key(data: dict[str, Any]) -> None:
    try:
        built = config.from_dict(data)
    except ConfigError as exc:
        check_error(exc, data)
        return
    assert isinstance(built, config.Settings)
    config.warnings(built)  # never raises
    try:
        App(built)  # builds every stage that can refuse a configuration
    except ConfigError as exc:
        check_error(exc, data)


@settings(SETTINGS, max_examples=200)
@given(data=documents, environ=environments)
def test_environment_overrides_are_applied_or_refused_with_their_name(
    data: dict[str, Any], environ: dict[str, str]
) -> None:
    try:
        merged = config.apply_env(config._deepcopy(data), environ)
    except ConfigError as exc:
        assert "\n" not in str(exc) and exc.key in environ, str(exc)
        return
    try:
        config.from_dict(merged)
    except ConfigError as exc:
        check_error(exc, merged)


@settings(SETTINGS, max_examples=200)
@given(data=junk)
def test_a_document_of_any_shape_is_refused_with_a_one_line_error(data: Any) -> None:
    if not isinstance(data, dict):
        data = {"server": data}
    try:
        config.from_dict(data)
    except ConfigError as exc:
        check_error(exc, data)


def test_an_unknown_key_with_a_control_character_is_named_on_one_line() -> None:
    # A quoted TOML key may hold any character ("a\nb" = 1 is valid TOML); check-config prints
    # the error and serve logs it, each promised as one line naming the key.
    for data in ({"a\nb": 1}, {"server": {"listen\r\nlevel": 1}}, {"routes": [{"x\x1b[2J": 1}]}):
        try:
            config.from_dict(data)
        except ConfigError as exc:
            assert not set(str(exc)) & {"\n", "\r", "\x1b"}, repr(str(exc))
        else:
            raise AssertionError(f"{data!r} was accepted")
