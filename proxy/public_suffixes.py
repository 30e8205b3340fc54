"""The Public Suffix List: which origin wildcards would let strangers in.

`https://*.com` would match every site on `.com`, `https://*.github.io` every GitHub Pages site
and `https://*.amazonaws.com` every S3 bucket: a name anyone can register or create under a public
suffix. The list (ICANN and private sections) is the one the `publicsuffixlist` package ships; it
is read from that file, once, the first time a wildcard origin is checked, and never fetched.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from publicsuffixlist import PSLFILE, PublicSuffixList

# RFC 6761: every name under localhost is loopback, so nobody else can own one; the list's
# default rule ("*": an unlisted TLD is public) would otherwise refuse http://*.localhost:5173.
_LOOPBACK = "localhost"


def wildcard_problem(base: str) -> str | None:
    """Why `*.{base}` would match names that others control, or None when it is safe."""
    base = _ascii(base.lower().rstrip("."))
    if not base:
        return "a wildcard needs a domain after '*.'"
    if base.rpartition(".")[2].isdigit():
        return "a wildcard cannot stand for part of an IP address"
    if base == _LOOPBACK or base.endswith("." + _LOOPBACK):
        return None
    if _list().is_public(base):
        return f"{base!r} is a public suffix (Public Suffix List): anyone can have a site under it"
    below = _public_below().get(base)
    if below is not None:
        return (
            f"{base!r} has public suffixes below it, e.g. {below!r} (Public Suffix List): "
            "anyone can have a site there"
        )
    return None


def _ascii(name: str) -> str:
    """IDN labels as punycode, label by label (a rule's "*" label stays as it is)."""
    if name.isascii():
        return name
    return ".".join(_ascii_label(label) for label in name.split("."))


def _ascii_label(label: str) -> str:
    try:
        return label.encode("idna").decode("ascii") if not label.isascii() else label
    except UnicodeError:
        return label


@functools.cache
def _list() -> PublicSuffixList:
    return PublicSuffixList()  # the bundled file; unknown TLDs count as public (the list's "*")


@functools.cache
def _public_below() -> Mapping[str, str]:
    """Every name with a public suffix below it -> one such suffix (for the error message)."""
    out: dict[str, str] = {}
    with open(PSLFILE, encoding="utf-8") as f:
        for line in f:
            rule = line.split(maxsplit=1)[0] if line.strip() else ""
            if not rule or rule.startswith(("//", "!")):
                continue  # comments, and exceptions (which make names private, not public)
            # Every proper parent of a rule has a public suffix below it; for "*.kawasaki.jp"
            # (every child of kawasaki.jp is public) that starts at kawasaki.jp itself.
            suffix = _ascii(rule.lower())
            labels = suffix.split(".")
            for i in range(1, len(labels)):
                parent = ".".join(labels[i:])
                if len(out.get(parent, suffix)) >= len(suffix):
                    out[parent] = suffix  # the shortest example reads best in an error
    return out
