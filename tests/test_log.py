"""Log lines: one per event, whatever a peer puts in the values."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from alb_proxy.observability.log import fields


def test_plain_values_stay_bare_and_others_are_quoted() -> None:
    assert fields(a="ok", b=None, c=3) == "a=ok b=- c=3"
    assert fields(a="two words", b='say "hi"') == 'a="two words" b="say \\"hi\\""'


def test_control_characters_cannot_forge_a_line() -> None:
    line = fields(sni="x\nINFO forged line\r\x00\x1b[31m")
    assert line == 'sni="x\\x0aINFO forged line\\x0d\\x00\\x1b[31m"'


@given(st.text())
def test_any_value_renders_on_one_line_of_printable_text(value: str) -> None:
    line = fields(v=value)
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in line)
