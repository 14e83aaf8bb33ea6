"""Numbers from the wire: ASCII digits only, within a stated range.

`str.isdigit()` accepts '²' (U+00B2) and any number of digits, which `int()` then refuses with a
ValueError nobody expects (or, past 4,300 digits, refuses to convert at all). Every attribute,
query parameter or element text that carries a number goes through `parse_int`, whose
`NumberError` says which rule was broken, so the caller answers with the right error condition.
"""

from __future__ import annotations

_DIGITS = frozenset("0123456789")
# Leading zeros are harmless, but a value no range needs more than this many characters for.
MAX_DIGITS = 24


class NumberError(ValueError):
    """A wire value that is not a number in range; `reason` is short and safe to log or send."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def parse_int(text: str | None, *, minimum: int = 0, maximum: int, name: str = "value") -> int:
    """`text` as an integer in [minimum, maximum]: an optional '-' (only if minimum < 0), then
    1 to MAX_DIGITS ASCII digits; anything else raises NumberError naming `name`."""
    if text is None:
        raise NumberError(name, "missing")
    digits = text[1:] if text.startswith("-") and minimum < 0 else text
    if not digits or not _DIGITS.issuperset(digits):
        raise NumberError(name, "not a decimal integer")
    if len(digits) > MAX_DIGITS:
        raise NumberError(name, "too many digits")
    value = int(text)
    if value < minimum:
        raise NumberError(name, f"below {minimum}")
    if value > maximum:
        raise NumberError(name, f"above {maximum}")
    return value


def parse_optional_int(text: str | None, *, minimum: int = 0, maximum: int,
                       name: str = "value") -> int | None:
    """Like `parse_int`, but an absent value (None) is None; an empty or bad one still raises."""
    return None if text is None else parse_int(text, minimum=minimum, maximum=maximum, name=name)
