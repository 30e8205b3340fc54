"""The one internal refusal of the auth stages: a machine reason plus a precise, safe message."""

from __future__ import annotations


class Rejected(Exception):
    """A credential was presented and is not acceptable; becomes a 401 in `chain`.

    `reason` is a short fixed code (used as a metric label and in the error details); `message`
    is for humans and never contains the credential or unvalidated client text. Where telling the
    client the precise reason would help an attacker (which API keys exist), `client` holds the
    `(reason, message)` the client gets instead; the precise pair is then logged, with
    `log_fields` (safe values only: a key id, never the key).
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        client: tuple[str, str] | None = None,
        log_fields: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.client = client
        self.log_fields = log_fields or {}
