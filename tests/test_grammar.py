"""The RFC grammar checks (grammar.py)."""

from __future__ import annotations

import re

from hypothesis import example, given
from hypothesis import strategies as st

from proxy import grammar

# RFC 9110 11.2 token68, as a regular expression: what `grammar.token68` must agree with.
TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
ALPHABET = st.sampled_from(list('aZ09-._~+/= \t\n,;"é\x00€'))


@given(st.text(ALPHABET, max_size=16) | st.text(max_size=16))
@example("")
@example("=")
@example("a==")
@example("a=b")
@example("abc\n")
@example("x" * 4000 + "=")
def test_token68_is_the_rfc_grammar(text: str) -> None:
    assert grammar.token68(text) == bool(TOKEN68.fullmatch(text))
