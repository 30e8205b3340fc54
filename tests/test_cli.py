"""The `authproxy` command line, run as a real process."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support.servers import ROOT, free_port

AUTHPROXY = [sys.executable, "-m", "proxy"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AUTHPROXY, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )


def test_check_config_summarises_a_good_config() -> None:
    result = run("check-config", "--config", str(ROOT / "config.toml"))
    assert result.returncode == 0, result.stderr
    assert "routes (5)" in result.stdout
    assert "demo (http://127.0.0.1:9000" in result.stdout
    assert "http://localhost:5173" in result.stdout


def test_check_config_names_the_bad_key_in_one_line_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[[routes]]\npath = "/a"\nauth = "public"\n'
        '[[routes]]\npath = "/b"\nauth = "public"\n'
        '[[routes]]\npath = "/c"\nauth = ["jtw"]\n'
    )
    result = run("check-config", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "authproxy: config error: routes[2].auth: unknown method 'jtw' "
        "(known: public, jwt, api_key)"
    ]
    assert "Traceback" not in result.stderr


def test_check_config_reads_the_config_path_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[server]\nlisten = 'bad'\n")
    result = run("check-config", env={**os.environ, "AUTHPROXY_CONFIG": str(config)})
    assert result.returncode == 2
    assert "server.listen" in result.stderr


def test_check_config_shows_which_keys_the_environment_set_without_their_values() -> None:
    env = {
        **os.environ,
        "AUTHPROXY__CORS__MAX_AGE_S": "61",
        "AUTHPROXY__UPSTREAM__URL": "http://127.0.0.1:9999",
    }
    result = run("check-config", "--config", str(ROOT / "config.toml"), env=env)
    assert result.returncode == 0, result.stderr
    assert "from the environment (2; values not shown):" in result.stdout
    assert re.search(r"cors\.max_age_s +AUTHPROXY__CORS__MAX_AGE_S", result.stdout)
    assert re.search(r"upstream\.url +AUTHPROXY__UPSTREAM__URL", result.stdout)
    assert "61" not in result.stdout
    plain = run("check-config", "--config", str(ROOT / "config.toml"))
    assert "from the environment" not in plain.stdout


def test_check_config_names_a_misspelt_environment_variable(tmp_path: Path) -> None:
    env = {**os.environ, "AUTHPROXY_CORS__MAX_AGE_S": "61"}
    result = run("check-config", "--config", str(ROOT / "config.toml"), env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "authproxy: config error: AUTHPROXY_CORS__MAX_AGE_S: malformed override name: "
        "AUTHPROXY__ takes two underscores"
    )


def test_hash_key_prints_the_record_on_stdout_and_the_new_key_on_stderr_only() -> None:
    result = run("hash-key", "--id", "ci-bot")
    assert result.returncode == 0
    key = re.search(r"key .*: (\S+)", result.stderr)
    assert key is not None
    assert key.group(1) not in result.stdout
    digest = hashlib.sha256(key.group(1).encode()).hexdigest()
    assert f'sha256 = "{digest}"' in result.stdout
    assert 'id = "ci-bot"' in result.stdout


def test_hash_key_hashes_a_given_key_without_echoing_it_as_new() -> None:
    result = run("hash-key", "my-existing-key-0", "--id", "old")
    assert result.returncode == 0
    assert hashlib.sha256(b"my-existing-key-0").hexdigest() in result.stdout
    assert "my-existing-key-0" not in result.stdout + result.stderr
    assert "ps" in result.stderr  # the warning that argv is visible


def test_hash_key_reads_a_given_key_from_stdin() -> None:
    result = subprocess.run(
        [*AUTHPROXY, "hash-key", "-", "--id", "piped", "--scope", "models:read"],
        input="a-key-from-the-vault-1234\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(b"a-key-from-the-vault-1234").hexdigest() in result.stdout
    assert 'scopes = ["models:read"]' in result.stdout
    assert "a-key-from-the-vault" not in result.stdout + result.stderr


def test_hash_key_refuses_a_short_key() -> None:
    result = run("hash-key", "hunter2", "--id", "weak")
    assert result.returncode == 2
    assert "shorter than 16 characters" in result.stderr
    assert "sha256" not in result.stdout


def _config_with_keys_file(tmp_path: Path, keys: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f"[auth.api_keys]\nkeys_file = {json.dumps(str(keys))}\n"
        '[[routes]]\npath = "/api/*"\nauth = ["api_key"]\n'
    )
    return config


def test_hash_key_appended_to_a_keys_file_leaves_a_file_check_config_accepts(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nid = "first"\nsha256 = "' + "0" * 64 + '"\n')
    config = _config_with_keys_file(tmp_path, keys)
    # What the newcomer typed: `authproxy hash-key --id bot >> keys.toml`.
    with keys.open("a") as out:
        result = subprocess.run(
            [*AUTHPROXY, "hash-key", "--id", "bot"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    assert result.returncode == 0
    key = re.search(r"key .*: (\S+)", result.stderr)
    assert key is not None and key.group(1) not in keys.read_text()
    check = run("check-config", "--config", str(config))
    assert check.returncode == 0, check.stderr
    assert "api keys: 0 inline" in check.stdout

    from proxy.auth.apikeys import read_keys_file

    assert [k.id for k in read_keys_file(str(keys))] == ["first", "bot"]


def test_hash_key_keys_file_option_appends_a_keys_record_and_refuses_a_taken_id(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys.toml"
    result = run("hash-key", "--id", "bot", "--keys-file", str(keys))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert keys.read_text().lstrip().startswith("[[keys]]")
    config = _config_with_keys_file(tmp_path, keys)
    assert run("check-config", "--config", str(config)).returncode == 0
    again = run("hash-key", "--id", "bot", "--keys-file", str(keys))
    assert again.returncode == 2
    assert "'bot' is already in the file" in again.stderr
    assert keys.read_text().count("[[keys]]") == 1


EXPLAIN_CONFIG = """
[[auth.jwt.providers]]
name = "t"
issuer = "https://idp.test"
audiences = ["api"]
secret_env = "EXPLAIN_SECRET"
algorithms = ["HS256"]
[[routes]]
path = "/auth/*"
auth = "public"
[[routes]]
path = "/api/*"
auth = ["jwt"]
scopes = ["models:read"]
"""
EXPLAIN_SECRET = "explain-secret-explain-secret-explain!"


def test_explain_says_why_a_request_is_accepted_or_refused(tmp_path: Path) -> None:
    import time

    import jwt

    config = tmp_path / "c.toml"
    config.write_text(EXPLAIN_CONFIG)
    env = {**os.environ, "EXPLAIN_SECRET": EXPLAIN_SECRET}
    claims = {
        "sub": "alice",
        "iss": "https://idp.test",
        "aud": "api",
        "exp": int(time.time()) + 60,
        "scope": "models:read",
    }
    good = jwt.encode(claims, EXPLAIN_SECRET, algorithm="HS256")
    ok = run(
        "explain",
        "--config",
        str(config),
        "GET",
        "/api/models",
        "-H",
        f"Authorization: Bearer {good}",
        env=env,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "routes[1]" in ok.stdout and "/api/models" in ok.stdout
    assert "alice" in ok.stdout
    assert good not in ok.stdout

    expired = jwt.encode(
        {**claims, "exp": int(time.time()) - 120}, EXPLAIN_SECRET, algorithm="HS256"
    )
    refused = run(
        "explain",
        "--config",
        str(config),
        "GET",
        "/api/models",
        "-H",
        f"Authorization: Bearer {expired}",
        env=env,
    )
    assert refused.returncode == 1
    assert "expired" in refused.stdout
    assert expired not in refused.stdout

    unsafe = run("explain", "--config", str(config), "GET", "/api/../admin", env=env)
    assert unsafe.returncode == 1
    assert "dot-segment" in unsafe.stdout


def test_check_config_and_serve_refuse_a_missing_secret_alike(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    port, admin_port = free_port(), free_port()
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
        + EXPLAIN_CONFIG.replace("EXPLAIN_SECRET", "UNSET_SECRET_FOR_TEST")
    )
    env = {k: v for k, v in os.environ.items() if k != "UNSET_SECRET_FOR_TEST"}
    checked = run("check-config", "--config", str(config), env=env)
    assert checked.returncode == 2
    assert "auth.jwt.providers[0].secret_env" in checked.stderr
    served = run("serve", "--config", str(config), env=env)
    assert served.returncode == 2
    assert "auth.jwt.providers[0].secret_env" in served.stdout
    assert "Traceback" not in served.stdout + served.stderr


def test_check_config_refuses_a_wildcard_origin_over_a_public_suffix(tmp_path: Path) -> None:
    # https://*.com passed check-config and then echoed https://evil.com with credentials.
    config = tmp_path / "c.toml"
    config.write_text(
        '[cors]\nallow_origins = ["https://*.com"]\nallow_credentials = true\n'
        '[[routes]]\npath = "/*"\nauth = "public"\n'
    )
    result = run("check-config", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("authproxy: config error: cors.allow_origins: [0] 'https://*.com'")
    assert "public suffix" in lines[0]


def test_check_config_prints_warnings_and_still_exits_0(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[[routes]]\npath = "/*"\nauth = "public"\n'
        '[[routes]]\npath = "/admin/*"\nauth = ["api_key"]\n'
    )
    result = run("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        "authproxy: config warning: routes[1]: never matches: "
        "routes[0] (/*) matches every request it would",
        "authproxy: config warning: routes[1].auth: 'api_key' is listed but no API key is "
        "configured (auth.api_keys.keys, auth.api_keys.keys_file)",
    ]
    assert "config OK" in result.stdout and "2 warnings" in result.stdout


def test_every_file_the_dockerfile_copies_is_in_the_repository() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = [
        source
        for line in dockerfile.splitlines()
        if line.startswith("COPY ") and "--from=" not in line  # not from another stage
        for source in line.split()[1:-1]
    ]
    assert "constraints.txt" in copied  # the image installs the versions the tests ran
    for source in copied:
        assert (ROOT / source).exists(), source


def test_the_sidecar_runs_without_the_demo_or_its_dependencies() -> None:
    # The package ships proxy/ alone; starlette is the demo's (the `demo` extra).
    code = (
        "import sys, proxy.cli, proxy.app, proxy.server, proxy.supervisor; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('starlette', 'upstream_demo')]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
