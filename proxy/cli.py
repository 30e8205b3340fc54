"""The `authproxy` command: serve, check-config, hash-key, explain."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

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

    explain = commands.add_parser("explain", help="show how a request would be judged")
    explain.add_argument("--config")
    explain.add_argument("method")
    explain.add_argument("target", help="path with optional query, e.g. /api/models?x=1")
    explain.add_argument(
        "-H", "--header", action="append", default=[], help="'Name: value' (repeatable)"
    )

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args.config)
        if args.command == "check-config":
            return _check_config(args.config)
        if args.command == "hash-key":
            return _hash_key(args.key, args.id, args.scope, args.keys_file)
        if args.command == "explain":
            return _explain(args.config, args.method, args.target, args.header)
    except ConfigError as exc:
        print(f"authproxy: config error: {exc}", file=sys.stderr)
        return 2
    return 2


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

        return supervise(settings, count)
    return serve(settings)
