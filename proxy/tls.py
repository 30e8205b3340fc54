"""TLS on both hops: the public listener's certificate (reloaded on SIGHUP) and the trust and client
certificate for an https/wss upstream.

Every file is read when the context is built, so a missing or unreadable file is a `ConfigError`
naming its key at start-up (and in `check-config`), never a handshake failure at the first client.
A reload that cannot read the new pair keeps the certificate in use.
"""

from __future__ import annotations

import logging
import ssl

from .config import ServerSettings, UpstreamSettings
from .errors import ConfigError

log = logging.getLogger("authproxy.tls")

# TLS 1.2 with forward-secret AEAD suites only, and TLS 1.3 (whose suites are all of that kind):
# Mozilla's "intermediate" profile, what nginx and Envoy ship as their modern default.
_TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


def server_context(server: ServerSettings) -> ssl.SSLContext | None:
    """The public listener's context (HTTP/1.1 only), or None without `server.tls_cert_file`."""
    if server.tls_cert_file is None or server.tls_key_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_pair(context, server.tls_cert_file, server.tls_key_file, "server.tls_cert_file")
    return context


def reload_server_certificate(context: ssl.SSLContext, server: ServerSettings) -> bool:
    """SIGHUP: read the certificate and key again into the live context; new handshakes present
    them, established connections keep theirs. A pair that cannot be loaded keeps the old one."""
    assert server.tls_cert_file is not None and server.tls_key_file is not None
    try:
        # Loaded into a scratch context first: a bad pair must not leave the live one half-set.
        _load_pair(
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
            server.tls_cert_file,
            server.tls_key_file,
            "server.tls_cert_file",
        )
        context.load_cert_chain(server.tls_cert_file, server.tls_key_file)
    except (ConfigError, OSError, ssl.SSLError) as exc:
        log.error("tls: certificate reload failed, keeping the one in use: %s", exc)
        return False
    log.info("tls: certificate reloaded from %s", server.tls_cert_file)
    return True


def upstream_context(upstream: UpstreamSettings) -> ssl.SSLContext | None:
    """The context for an https upstream (and its wss tunnel), or None for http."""
    if not upstream.url.startswith("https://"):
        return None
    try:
        # With ca_file, that bundle alone is trusted (not added to the system's store).
        context = ssl.create_default_context(cafile=upstream.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "upstream.ca_file", f"cannot load {upstream.ca_file!r}: {_why(exc)}"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if upstream.client_cert_file is not None and upstream.client_key_file is not None:
        _load_pair(
            context,
            upstream.client_cert_file,
            upstream.client_key_file,
            "upstream.client_cert_file",
        )
    return context


def _load_pair(context: ssl.SSLContext, cert_file: str, key_file: str, key: str) -> None:
    try:
        context.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        raise ConfigError(key, f"no such file {exc.filename or cert_file!r}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            key, f"cannot load the certificate {cert_file!r} with its key {key_file!r}: {_why(exc)}"
        ) from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
