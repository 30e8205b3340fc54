"""`[state]`, `[[rate_limits]]` and `admin.token_env` as the config loader judges them: one line
naming the key for anything wrong, including limits the memory backend could not hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import from_dict
from proxy.errors import ConfigError
from tests.support.servers import ROOT

ROUTES = [{"path": "/api/*", "auth": "public"}, {"path": "/ws", "auth": "public"}]


def load(**extra: object) -> object:
    return from_dict({"routes": ROUTES, **extra})


def error_of(**extra: object) -> str:
    with pytest.raises(ConfigError) as info:
        load(**extra)
    return str(info.value)


def test_a_rule_naming_a_path_no_route_has_is_refused_naming_the_item() -> None:
    rule = {"name": "r", "routes": ["/api/*", "/apy/*"], "limit": 5}
    assert error_of(rate_limits=[rule]) == (
        "rate_limits[0].routes[1]: '/apy/*' is not the path of any [[routes]] entry"
    )


def test_rule_names_are_unique_and_fit_a_header() -> None:
    twice = [{"name": "r", "limit": 1}, {"name": "r", "limit": 2}]
    assert error_of(rate_limits=twice) == "rate_limits[1].name: 'r' is used twice"
    assert error_of(rate_limits=[{"name": 'a"b', "limit": 1}]).startswith("rate_limits[0].name:")


def test_a_rule_must_limit_something() -> None:
    assert error_of(rate_limits=[{"name": "r"}]).startswith("rate_limits[0]: set limit")
    assert error_of(rate_limits=[{"name": "r", "limit": 5, "by": "user"}]).startswith(
        "rate_limits[0].by:"
    )


def test_state_keys_are_checked() -> None:
    assert error_of(state={"backend": "etcd"}).startswith("state.backend:")
    assert error_of(state={"on_error": "maybe"}).startswith("state.on_error:")
    assert error_of(state={"redis_url": "http://x"}).startswith("state.redis_url:")


def test_workers_with_memory_limits_are_refused_naming_workers_and_state() -> None:
    rules = [{"name": "r", "limit": 5}]
    message = error_of(server={"workers": 4}, rate_limits=rules)
    assert message.startswith("server.workers: 4 with [[rate_limits]] needs state.backend")
    # The same with Redis, or without limits, is fine.
    load(server={"workers": 4}, rate_limits=rules, state={"backend": "redis"})
    load(server={"workers": 4})


def test_check_config_refuses_memory_limits_with_workers_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nworkers = 2\n[[routes]]\npath = "/*"\nauth = "public"\n'
        '[[rate_limits]]\nname = "r"\nlimit = 5\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.workers" in lines[0] and "state.backend" in lines[0]


def test_an_admin_token_variable_that_is_unset_or_short_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[admin]\ntoken_env = "AP_ADMIN"\n[[routes]]\npath = "/*"\nauth = "public"\n')
    for value in (None, "short"):
        env = {"PATH": "/usr/bin:/bin"} | ({"AP_ADMIN": value} if value else {})
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "check-config", "--config", str(path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert done.returncode == 2
        assert done.stderr.strip() == (
            "authproxy: config error: admin.token_env: "
            "$AP_ADMIN must hold a secret of at least 16 characters"
        )


async def test_explain_names_the_rules_a_request_is_under_without_counting_it() -> None:
    from proxy.config import Settings
    from proxy.explain import explain

    settings = load(
        rate_limits=[
            {"name": "per-caller", "routes": ["/api/*"], "limit": 100, "window_s": 60},
            {"name": "streams", "concurrent": 2, "by": "ip"},
        ]
    )
    assert isinstance(settings, Settings)
    ok, text = await explain(settings, "GET", "/api/models", [])
    assert ok
    line = next(x for x in text.splitlines() if x.startswith("rate limits:"))
    assert "per-caller (100 per 60 s, by identity)" in line
    assert "streams (2 at once, by ip)" in line and "state: memory" in line
    ok, text = await explain(settings, "GET", "/ws", [])
    line = next(x for x in text.splitlines() if x.startswith("rate limits:"))
    assert "per-caller" not in line and "streams" in line


def test_check_config_summarises_the_state_backend_and_rules(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[state]\nbackend = "redis"\non_error = "deny"\n[[routes]]\npath = "/*"\nauth = "public"\n'
        '[[rate_limits]]\nname = "per-caller"\nlimit = 5\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "  state: redis (on_error deny); rate limits (1): per-caller" in done.stdout


@pytest.mark.parametrize(
    "url",
    [
        "redis//:S3cretPass@redis:6379/0",
        "http://:S3cretPass@redis:6379/0",
        "redis://:S3cretPass@h/0?db=3",
    ],
)
def test_a_bad_redis_url_is_refused_without_echoing_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        from_dict({"state": {"backend": "redis", "redis_url": url}})
    assert str(refused.value).startswith("state.redis_url: ")
    assert "S3cretPass" not in str(refused.value)
