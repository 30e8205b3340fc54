"""The one internal refusal of the auth stages: a machine reason plus a precise, safe message."""

from __future__ import annotations


class Rejected(Exception):
    """A credential was presented and is not acceptable; becomes a 401 in `chain`.

    `reason` is a short fixed code (used as a metric label and in the error details); `message`
    is for humans and never contains the credential or unvalidated client text.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
