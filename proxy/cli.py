"""The `authproxy` command: serve, check-config, hash-key, explain, coverage, revoke,
healthcheck."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

from . import config
from .errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="authproxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the sidecar")
    serve.add_argument("--config", help="config file (default: $AUTHPROXY_CONFIG, ./config.toml)")

    check = commands.add_parser("check-config", help="validate a config and summarise it")
    check.add_argument("--config")

    hash_key = commands.add_parser(
        "hash-key",
        help="make an API key (or hash KEY) and its record",
        description="The record goes to stdout, a new key to stderr: "
        "`authproxy hash-key --id bot >> keys.toml` leaves a valid keys file and no plaintext key.",
    )
    hash_key.add_argument(
        "key",
        nargs="?",
        help="an existing key to hash; '-' reads it from stdin (argv is visible in ps and shell "
        "history); default: a new one",
    )
    hash_key.add_argument("--id", default="my-key", help="the key id for the TOML record")
    hash_key.add_argument(
        "--scope", action="append", default=[], help="a scope for the record (repeatable)"
    )
    hash_key.add_argument(
        "--keys-file", metavar="PATH", help="append a [[keys]] record to this keys file instead"
    )

    health = commands.add_parser(
        "healthcheck", help="exit 0 when the admin listener's /healthz answers 200 (containers)"
    )
    health.add_argument("--config")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")

    explain = commands.add_parser("explain", help="show how a request would be judged")
    explain.add_argument("--config")
    explain.add_argument("method")
    explain.add_argument("target", help="path with optional query, e.g. /api/models?x=1")
    explain.add_argument(
        "-H", "--header", action="append", default=[], help="'Name: value' (repeatable)"
    )

    coverage = commands.add_parser(
        "coverage", help="which operations of an OpenAPI document the routes protect"
    )
    coverage.add_argument("--config")
    coverage.add_argument(
        "--openapi", required=True, help="the upstream's OpenAPI document (JSON, or .yaml)"
    )

    revoke = commands.add_parser(
        "revoke", help="revoke an API key or a JWT on every sidecar of the state backend"
    )
    revoke.add_argument("--config")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--key-id", help="an API key id")
    which.add_argument("--jti", help="a JWT id (its jti claim)")
    revoke.add_argument(
        "--until", help="RFC 3339; default: for good (--key-id), 24 hours from now (--jti)"
    )

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args.config)
        if args.command == "check-config":
            return _check_config(args.config)
        if args.command == "hash-key":
            return _hash_key(args.key, args.id, args.scope, args.keys_file)
        if args.command == "healthcheck":
            return _healthcheck(args.config, args.timeout)
        if args.command == "explain":
            return _explain(args.config, args.method, args.target, args.header)
        if args.command == "coverage":
            return _coverage(args.config, args.openapi)
        if args.command == "revoke":
            return _revoke(args.config, args.key_id, args.jti, args.until)
    except ConfigError as exc:
        print(f"authproxy: config error: {exc}", file=sys.stderr)
        return 2
    return 2


def _admin_address(settings: config.Settings) -> tuple[str, int]:
    """Where this machine reaches the admin listener (a wildcard address is its loopback)."""
    host, port = config.split_listen(settings.admin.listen)
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host), port


def _healthcheck(path: str | None, timeout: float) -> int:
    """A container's HEALTHCHECK: asks /healthz on the admin listener the config names, so the
    check follows `admin.listen` (and its environment override) wherever it is moved."""
    import http.client

    settings = config.load(path)
    host, port = _admin_address(settings)
    try:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        connection.request("GET", "/healthz")
        status = connection.getresponse().status
        connection.close()
    except OSError as exc:
        print(f"authproxy: unhealthy: admin.listen {settings.admin.listen}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"authproxy: unhealthy: /healthz answered {status}", file=sys.stderr)
        return 1
    return 0


def _check_config(path: str | None) -> int:
    from .app import App

    settings = config.load(path)
    asyncio.run(App(settings).check())  # every stage, as serve builds it: secrets, key files
    warnings = config.warnings(settings)
    for line in warnings:
        print(f"authproxy: config warning: {line}", file=sys.stderr)
    counted = f" ({len(warnings)} warning{'s' if len(warnings) != 1 else ''})" if warnings else ""
    print(f"config OK: {path or config.default_path()}{counted}")
    print(
        f"  listen {settings.server.listen}, admin {settings.admin.listen}, "
        f"upstream {settings.upstream.url}"
    )
    print(f"  routes ({len(settings.routes)}):")
    labels = config.route_names(settings.routes)
    for i, r in enumerate(settings.routes):
        methods = ",".join(r.methods) if r.methods else "*"
        auth = "public" if r.public else " | ".join(r.auth)
        scopes = f" scopes={' '.join(r.scopes)}" if r.scopes else ""
        optional = " (optional)" if r.auth_optional else ""
        label = f"  [metrics: {labels[i]}]" if labels[i] != r.path else ""
        print(f"    [{i}] {methods:<8} {r.path:<24} {auth}{optional}{scopes}{label}")
    providers = settings.auth.jwt.providers
    print(
        f"  jwt providers ({len(providers)}): "
        + (
            ", ".join(f"{p.name} ({p.issuer}; {', '.join(p.algorithms)})" for p in providers)
            or "none"
        )
    )
    keys = settings.auth.api_keys
    print(
        f"  api keys: {len(keys.keys)} inline"
        + (f", file {keys.keys_file}" if keys.keys_file else "")
        + f", header {keys.header}"
    )
    print(
        f"  cors origins: {', '.join(settings.cors.allow_origins) or 'none'}"
        f" (credentials {'on' if settings.cors.allow_credentials else 'off'})"
    )
    if settings.rate_limits or settings.state.backend != "memory":
        print(
            f"  state: {settings.state.backend} (on_error {settings.state.on_error}); "
            f"rate limits ({len(settings.rate_limits)}): "
            + (", ".join(rule.name for rule in settings.rate_limits) or "none")
        )
    overrides = config.env_overrides(os.environ)
    if overrides:
        # Names only: an override may carry anything, and this summary ends up in CI logs.
        print(f"  from the environment ({len(overrides)}; values not shown):")
        for name, key in overrides:
            print(f"    {key:<32} {name}")
    return 0


def _hash_key(key: str | None, key_id: str, scopes: list[str], keys_file: str | None) -> int:
    from .auth.apikeys import MIN_KEY_CHARS, key_record, new_key, read_keys_file

    if key == "-":
        key = sys.stdin.readline().rstrip("\r\n")
    elif key is not None:
        print(
            "authproxy: note: a key on the command line stays in shell history and is visible "
            "in ps; 'authproxy hash-key -' reads it from stdin",
            file=sys.stderr,
        )
    if key is not None and len(key) < MIN_KEY_CHARS:
        print(
            f"authproxy: hash-key: refused: a key shorter than {MIN_KEY_CHARS} characters is "
            "guessable (omit KEY for a new random one)",
            file=sys.stderr,
        )
        return 2
    made = key is None
    if key is None:
        key = new_key()
    try:
        record = key_record(key_id, key, scopes=scopes, table="keys" if keys_file else None)
    except ValueError as exc:
        print(f"authproxy: hash-key: {exc}", file=sys.stderr)
        return 2
    if keys_file is not None:
        if os.path.exists(keys_file):
            taken = {k.id for k in read_keys_file(keys_file)}
            if key_id in taken:
                raise ConfigError(f"{keys_file}: keys", f"the id {key_id!r} is already in the file")
        with open(keys_file, "a", encoding="utf-8") as f:
            f.write("\n" + record)
        print(f"authproxy: appended key {key_id!r} to {keys_file}", file=sys.stderr)
    else:
        print(record, end="")
    if made:
        # stderr: the record on stdout can be redirected into a file without the secret.
        print(f"key (give this to the client; it is not stored anywhere): {key}", file=sys.stderr)
    return 0


def _explain(path: str | None, method: str, target: str, raw_headers: list[str]) -> int:
    from .explain import explain

    settings = config.load(path)
    headers = []
    for h in raw_headers:
        name, sep, value = h.partition(":")
        if not sep:
            raise ConfigError("-H", f"expected 'Name: value', got {h!r}")
        headers.append((name.strip(), value.strip()))
    ok, report = asyncio.run(explain(settings, method.upper(), target, headers))
    print(report)
    return 0 if ok else 1


def _coverage(path: str | None, openapi: str) -> int:
    from .coverage import judge, load_document, table

    settings = config.load(path)
    ops = judge(settings, load_document(openapi))
    print(table(ops))
    return 1 if any(o.problem for o in ops) else 0


def _revoke(path: str | None, key_id: str | None, jti: str | None, until: str | None) -> int:
    import time

    from .admin import parse_revocation

    settings = config.load(path)
    request: dict[str, str] = {"key_id": key_id} if key_id else {"jti": jti or ""}
    if until is not None:
        request["until"] = until
    elif jti is not None:
        # A token lives minutes: a day outlives any sane one without the list growing for good.
        stamp = time.gmtime(time.time() + 86400)
        request["until"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", stamp)
    try:
        revocation = parse_revocation(request)
    except ValueError as exc:
        raise ConfigError("--until" if until else "--key-id/--jti", str(exc)) from None
    what = f"API key {key_id!r}" if key_id else f"token jti {jti!r}"
    if settings.state.backend == "redis":
        from .state.redis_store import client, publish

        async def send() -> None:
            redis = client(settings.state)
            try:
                await publish(redis, settings.state, revocation)
            finally:
                await redis.aclose()

        try:
            asyncio.run(send())
        except Exception as exc:  # redis' errors, OSError, timeouts: one line, exit 1
            print(f"authproxy: revoke failed: redis: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        where = urlsplit(settings.state.redis_url)
        shown = where.hostname or where.path  # never the password a URL may hold
        print(f"revoked {what} on every sidecar sharing the redis at {shown}")
        return 0
    return _revoke_through_admin(settings, request, what)


def _revoke_through_admin(settings: config.Settings, request: dict[str, str], what: str) -> int:
    import json
    import urllib.error
    import urllib.request

    name = settings.admin.token_env
    token = os.environ.get(name, "") if name else ""
    if not token:
        raise ConfigError(
            "admin.token_env", "the memory backend revokes through the admin listener: set it"
        )
    host, port = _admin_address(settings)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/revocations"
    req = urllib.request.Request(
        url,
        data=json.dumps(request).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as answer:
            answer.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:200]
        print(f"authproxy: revoke failed: {url} answered {exc.code}: {detail}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"authproxy: revoke failed: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"revoked {what} on the sidecar at {settings.admin.listen}")
    return 0


def _serve(path: str | None) -> int:
    from . import workers
    from .server import serve, serve_worker

    role = workers.WorkerRole.from_environ(os.environ)
    if role is not None:  # started by a supervisor, with the settings it validated
        return serve_worker(role.settings(), role)
    settings = config.load(path)
    count = workers.count(settings.server.workers)
    if count > 1:
        from .supervisor import supervise

        return supervise(settings, count, path)
    return serve(settings, source=lambda: config.load(path))
