"""server.xml.numbers: the one way numbers are read from the wire."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.xml.numbers import MAX_DIGITS, NumberError, parse_int, parse_optional_int


@pytest.mark.parametrize("text", ["²", "1²", "١٢", "", " 1", "1 ", "+1", "0x10", "1.0", "1e3",
                                  "-1", "--1", "9" * 5000, "1" + "0" * MAX_DIGITS])
def test_rejects_what_is_not_ascii_digits_in_range(text: str) -> None:
    with pytest.raises(NumberError) as raised:
        parse_int(text, maximum=10**30, name="rid")
    assert raised.value.name == "rid"


def test_range_is_checked_and_named() -> None:
    assert parse_int("007", maximum=10) == 7
    with pytest.raises(NumberError, match="above 10"):
        parse_int("11", maximum=10)
    with pytest.raises(NumberError, match="below 1"):
        parse_int("0", minimum=1, maximum=10)
    assert parse_int("-5", minimum=-10, maximum=10) == -5
    with pytest.raises(NumberError, match="missing"):
        parse_int(None, maximum=10)


def test_optional() -> None:
    assert parse_optional_int(None, maximum=5) is None
    assert parse_optional_int("5", maximum=5) == 5
    with pytest.raises(NumberError):
        parse_optional_int("", maximum=5)


@given(st.text(max_size=40))
def test_never_raises_anything_but_number_error(text: str) -> None:
    try:
        value = parse_int(text, minimum=-(10**6), maximum=10**6)
    except NumberError:
        return
    assert -(10**6) <= value <= 10**6 and text.lstrip("-").isascii()
