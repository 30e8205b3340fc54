"""API keys: lookup by hash, expiry, disabling, keys_file reloads and revocation announcements."""

from __future__ import annotations

import asyncio
import logging
import os
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from proxy.auth import AuthService, hash_key, key_record, new_key
from proxy.auth.rejected import Rejected
from proxy.config import ApiKeySettings
from proxy.errors import ConfigError, Unauthorized
from proxy.identity import Identity
from proxy.telemetry.metrics import Metrics

from .conftest import MakeService
from .support import make_settings, route

R = route(["api_key"])
KEY_A, KEY_B, KEY_C = new_key(), new_key(), new_key()


def record(key_id: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"id": key_id, "sha256": hash_key(key), "scopes": ["models:read"], **extra}


async def auth(
    svc: AuthService, key: str, *, websocket: bool = False, query: bool = False
) -> Identity:
    if query:
        creds = svc.extract([], b"api_key=" + key.encode(), websocket=websocket)
    else:
        creds = svc.extract([(b"x-api-key", key.encode())], b"", websocket=websocket)
    identity = await svc.authenticate(R, creds)
    assert identity is not None
    return identity


async def reason_of(svc: AuthService, key: str) -> str:
    """The precise reason a key is refused, as the log and metrics keep it.

    The client is told only that the key is invalid (see the oracle test below).
    """
    with pytest.raises(Unauthorized) as info:
        await auth(svc, key)
    assert key not in info.value.message
    assert info.value.details["reason"] == "invalid_api_key"
    with pytest.raises(Rejected) as precise:
        svc.api_keys.lookup(key)
    return precise.value.reason


def write_keys(path: Path, *records: dict[str, Any], raw: str | None = None) -> None:
    if raw is None:
        lines = []
        for r in records:
            lines.append("[[keys]]")
            for k, v in r.items():
                if isinstance(v, bool):
                    lines.append(f"{k} = {str(v).lower()}")
                elif isinstance(v, list):
                    lines.append(f"{k} = {v!r}".replace("'", '"'))
                elif k == "expires" and isinstance(v, datetime):
                    lines.append(f"{k} = {v.isoformat()}")
                else:
                    lines.append(f'{k} = "{v}"')
        raw = "\n".join(lines) + "\n"
    path.write_text(raw)
    # make sure the watcher sees a change even within one mtime tick
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


async def test_a_valid_key_gives_its_identity(make_service: MakeService) -> None:
    svc = await make_service(make_settings(api_keys={"keys": [record("ci-bot", KEY_A)]}))
    identity = await auth(svc, KEY_A)
    assert identity.method == "api_key" and identity.subject == "ci-bot"
    assert identity.credential_id == "ci-bot" and identity.scopes == {"models:read"}
    assert identity.issuer is None and identity.expires_at is None


async def test_an_unknown_key_is_refused(make_service: MakeService) -> None:
    svc = await make_service(make_settings(api_keys={"keys": [record("ci-bot", KEY_A)]}))
    assert await reason_of(svc, KEY_B) == "unknown_api_key"
    assert await reason_of(svc, KEY_A.upper()) == "unknown_api_key"


@pytest.mark.parametrize("form", ["datetime", "rfc3339-string"])
async def test_an_expired_key_is_refused_in_both_datetime_forms(
    make_service: MakeService, form: str
) -> None:
    past = datetime(2020, 1, 1, tzinfo=UTC)
    future = datetime.now(UTC) + timedelta(days=1)

    def when(d: datetime) -> Any:
        return d if form == "datetime" else d.isoformat().replace("+00:00", "Z")

    svc = await make_service(
        make_settings(
            api_keys={
                "keys": [
                    record("old", KEY_A, expires=when(past)),
                    record("new", KEY_B, expires=when(future)),
                ]
            }
        )
    )
    assert await reason_of(svc, KEY_A) == "api_key_expired"
    identity = await auth(svc, KEY_B)
    assert identity.expires_at == pytest.approx(future.timestamp(), abs=1)


async def test_an_expiry_without_time_zone_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        make_settings(api_keys={"keys": [record("k", KEY_A, expires="2030-01-01T00:00:00")]})
    assert info.value.key == "auth.api_keys.keys[0].expires"


async def test_a_disabled_key_is_refused(make_service: MakeService) -> None:
    svc = await make_service(
        make_settings(api_keys={"keys": [record("off", KEY_A, disabled=True)]})
    )
    assert await reason_of(svc, KEY_A) == "api_key_disabled"


async def test_overlapping_keys_both_work_during_rotation(make_service: MakeService) -> None:
    svc = await make_service(
        make_settings(api_keys={"keys": [record("bot-2024", KEY_A), record("bot-2025", KEY_B)]})
    )
    assert (await auth(svc, KEY_A)).subject == "bot-2024"
    assert (await auth(svc, KEY_B)).subject == "bot-2025"


async def test_the_query_parameter_counts_only_on_websocket_handshakes(
    make_service: MakeService,
) -> None:
    svc = await make_service(make_settings(api_keys={"keys": [record("bot", KEY_A)]}))
    assert (await auth(svc, KEY_A, websocket=True, query=True)).subject == "bot"
    with pytest.raises(Unauthorized) as info:
        await auth(svc, KEY_A, websocket=False, query=True)
    assert info.value.details["reason"] == "missing_credentials"


async def test_two_keys_with_the_same_secret_are_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        from proxy.auth.apikeys import ApiKeyStore

        settings = make_settings(api_keys={"keys": [record("a", KEY_A), record("b", KEY_A)]})
        ApiKeyStore(settings.auth.api_keys, Metrics())
    assert info.value.key == "auth.api_keys.keys[1].sha256"


async def test_a_bad_keys_file_at_start_names_the_file_and_key(
    make_service: MakeService, tmp_path: Path
) -> None:
    path = tmp_path / "keys.toml"
    write_keys(path, raw='[[keys]]\nid = "broken"\nsha256 = "xyz"\n')
    with pytest.raises(ConfigError) as info:
        await make_service(make_settings(api_keys={"keys_file": str(path)}))
    assert str(path) in info.value.key and "keys[0].sha256" in info.value.key
    assert "broken" in info.value.message


async def test_keys_file_reload_on_change_and_on_reload_keys(
    make_service: MakeService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.toml"
    write_keys(path, record("file-a", KEY_A))
    metrics = Metrics()
    svc = await make_service(
        make_settings(
            api_keys={
                "keys_file": str(path),
                "watch_interval_s": 0.05,
                "keys": [record("inline", KEY_C)],
            }
        ),
        metrics=metrics,
    )
    assert (await auth(svc, KEY_A)).subject == "file-a"
    assert (await auth(svc, KEY_C)).subject == "inline"

    with caplog.at_level(logging.DEBUG):
        write_keys(path, record("file-b", KEY_B))
        for _ in range(50):
            await asyncio.sleep(0.02)
            if any(k.id == "file-b" for k in svc.api_keys.keys):
                break
    assert (await auth(svc, KEY_B)).subject == "file-b"
    assert await reason_of(svc, KEY_A) == "unknown_api_key"
    for key in (KEY_A, KEY_B, KEY_C):
        assert key not in caplog.text and hash_key(key) not in caplog.text

    # SIGHUP path: reload_keys() with the watcher unable to notice first.
    svc.api_keys._interval = 3600
    path.write_text(f'[[keys]]\nid = "file-a"\nsha256 = "{hash_key(KEY_A)}"\n')
    svc.reload_keys()
    assert (await auth(svc, KEY_A)).subject == "file-a"
    ok = metrics.registry.get_sample_value("authproxy_api_key_reloads_total", {"result": "ok"})
    assert ok is not None and ok >= 2


@pytest.mark.parametrize(
    "bad",
    [
        "this is not toml [[[",
        '[[keys]]\nid = "x"\n',
        '[[keys]]\nid = "x"\nsha256 = "' + "0" * 64 + '"\nexpires = 2030-01-01T00:00:00\n',
        '[[keys]]\nid = "x"\nsha256 = "' + "0" * 64 + '"\ncolour = "red"\n',
        "unexpected = 1\n",
        None,  # the file disappears
    ],
)
async def test_a_bad_keys_file_keeps_the_old_set(
    make_service: MakeService, tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: str | None
) -> None:
    path = tmp_path / "keys.toml"
    write_keys(path, record("file-a", KEY_A))
    metrics = Metrics()
    svc = await make_service(
        make_settings(api_keys={"keys_file": str(path), "watch_interval_s": 0}), metrics=metrics
    )
    if bad is None:
        path.unlink()
    else:
        path.write_text(bad)
    with caplog.at_level(logging.ERROR, "authproxy.auth"):
        svc.reload_keys()
    assert str(path) in caplog.text and "keeping the previous key set" in caplog.text
    assert (await auth(svc, KEY_A)).subject == "file-a"
    err = metrics.registry.get_sample_value("authproxy_api_key_reloads_total", {"result": "error"})
    assert err == 1


async def test_revocation_callbacks_fire_for_removed_disabled_and_replaced_keys(
    make_service: MakeService, tmp_path: Path
) -> None:
    path = tmp_path / "keys.toml"
    write_keys(
        path,
        record("gone", KEY_A),
        record("off", KEY_B),
        record("swap", KEY_C),
        record("stays", "s" * 40),
    )
    svc = await make_service(
        make_settings(api_keys={"keys_file": str(path), "watch_interval_s": 0})
    )
    heard: list[str] = []
    unsubscribe = svc.subscribe_revocations(heard.append)
    write_keys(
        path,
        record("off", KEY_B, disabled=True),
        record("swap", new_key()),
        record("stays", "s" * 40),
    )
    svc.reload_keys()
    assert sorted(heard) == ["gone", "off", "swap"]
    unsubscribe()
    write_keys(path, record("stays", "t" * 40))
    svc.reload_keys()
    assert sorted(heard) == ["gone", "off", "swap"]


async def test_revocation_fires_when_a_key_expires(make_service: MakeService) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=0.4)
    svc = await make_service(
        make_settings(
            api_keys={"keys": [record("short", KEY_A, expires=soon), record("long", KEY_B)]}
        )
    )
    heard: list[str] = []
    svc.subscribe_revocations(heard.append)
    assert (await auth(svc, KEY_A)).subject == "short"
    for _ in range(50):
        await asyncio.sleep(0.02)
        if heard:
            break
    assert heard == ["short"]
    assert await reason_of(svc, KEY_A) == "api_key_expired"


async def test_a_failing_callback_does_not_stop_the_others(
    make_service: MakeService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.toml"
    write_keys(path, record("gone", KEY_A))
    svc = await make_service(
        make_settings(api_keys={"keys_file": str(path), "watch_interval_s": 0})
    )
    heard: list[str] = []

    def broken(_: str) -> None:
        raise RuntimeError("boom")

    svc.subscribe_revocations(broken)
    svc.subscribe_revocations(heard.append)
    write_keys(path, raw="")
    with caplog.at_level(logging.ERROR, "authproxy.auth"):
        svc.reload_keys()
    assert heard == ["gone"] and "revocation callback failed" in caplog.text


def test_new_key_hash_key_and_the_record_round_trip() -> None:
    key = new_key()
    assert key.startswith("ak_") and len(key) > 40 and key != new_key()
    assert hash_key(key) == __import__("hashlib").sha256(key.encode()).hexdigest()
    block = key_record("ci-bot", key)
    assert block.startswith("[[auth.api_keys.keys]]\n") and key not in block
    parsed = tomllib.loads(block)["auth"]["api_keys"]["keys"][0]
    assert ApiKeySettings.model_validate(parsed).sha256 == hash_key(key)
    tricky = key_record('we"ird\nid', key, table="keys")
    assert tomllib.loads(tricky)["keys"][0]["id"] == 'we"ird\nid'


def test_a_keys_file_reads_config_style_records_beside_its_own(tmp_path: Path) -> None:
    from proxy.auth.apikeys import read_keys_file

    path = tmp_path / "keys.toml"
    path.write_text(key_record("short", KEY_A, table="keys") + key_record("long", KEY_B))
    assert [k.id for k in read_keys_file(str(path))] == ["short", "long"]
    path.write_text(key_record("short", KEY_A, table="keys") + "[auth.jwt]\nx = 1\n")
    with pytest.raises(ConfigError) as caught:
        read_keys_file(str(path))
    assert str(caught.value).startswith(f"{path}: auth: only [[auth.api_keys.keys]]")


async def test_unknown_disabled_and_expired_keys_look_alike_to_the_client(
    make_service: MakeService, caplog: pytest.LogCaptureFixture
) -> None:
    # An oracle: different 401s told a key-holder which of their stolen or old keys still exist.
    past = datetime(2020, 1, 1, tzinfo=UTC)
    svc = await make_service(
        make_settings(
            api_keys={
                "keys": [record("off", KEY_A, disabled=True), record("old", KEY_B, expires=past)]
            }
        )
    )
    seen = []
    with caplog.at_level(logging.INFO, "authproxy.auth"):
        for key in (KEY_A, KEY_B, KEY_C):
            with pytest.raises(Unauthorized) as info:
                await auth(svc, key)
            exc = info.value
            seen.append((exc.message, exc.details, exc.headers, exc.status))
    assert seen[0] == seen[1] == seen[2]
    assert seen[0][1] == {"reason": "invalid_api_key", "method": "api_key"}
    # The operator still learns exactly what happened, and which key (never the key itself).
    refused = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "auth_refused"]
    assert [r.fields["reason"] for r in refused] == [  # type: ignore[attr-defined]
        "api_key_disabled",
        "api_key_expired",
        "unknown_api_key",
    ]
    assert [r.fields.get("key_id") for r in refused] == ["off", "old", None]  # type: ignore[attr-defined]
    for key in (KEY_A, KEY_B, KEY_C):
        assert key not in caplog.text and hash_key(key)[:12] not in caplog.text


async def test_a_key_keeps_one_identity_until_a_reload_changes_the_key(
    make_service: MakeService, tmp_path: Path
) -> None:
    # One identity object per key: what the upstream hop derives from it is made once.
    path = tmp_path / "keys.toml"
    write_keys(path, record("file-a", KEY_A))
    svc = await make_service(make_settings(api_keys={"keys_file": str(path)}))
    first = await auth(svc, KEY_A)
    assert await auth(svc, KEY_A) is first
    # The same secret with other scopes: the new key's identity, never the remembered one.
    write_keys(path, record("file-a", KEY_A, scopes=["models:write"]))
    svc.reload_keys()
    changed = await auth(svc, KEY_A)
    assert changed is not first and changed.scopes == {"models:write"}
    # Disabled after it was remembered: refused, whatever is remembered.
    write_keys(path, record("file-a", KEY_A, disabled=True))
    svc.reload_keys()
    assert await reason_of(svc, KEY_A) == "api_key_disabled"
