"""Where each table and key of a TOML document is (tomllib reports no lines)."""

from __future__ import annotations

import bisect
import contextlib
import re
import tomllib
from collections.abc import Iterator

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR = re.compile(r"[^,\]}#\r\n]+")


class Locator:
    """The line of each table and key of a TOML document; tomllib reports none.

    A scanner for documents tomllib has already accepted: headers (``[a.b]``, ``[[a]]``), dotted
    and quoted keys, inline tables and arrays (also across lines), the four kinds of string.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._i = 0
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.lines: dict[tuple[str, ...], int] = {}
        with contextlib.suppress(IndexError, ValueError):  # not on valid TOML; keep what we found
            self._document()

    def line(self, path: tuple[str, ...]) -> int:
        """Line of the key, else of its nearest enclosing table, else 0."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return 0

    def _record(self, path: tuple[str, ...], at: int) -> None:
        line = bisect.bisect_right(self._starts, at)
        for n in range(1, len(path) + 1):  # [a.b] and a.b = 1 define table a too
            self.lines.setdefault(path[:n], line)

    def _peek(self, n: int = 1) -> str:
        return self._text[self._i:self._i + n]

    def _skip(self, newlines: bool) -> None:
        text, n = self._text, len(self._text)
        while self._i < n:
            c = text[self._i]
            if c in " \t" or (newlines and c in "\r\n"):
                self._i += 1
            elif c == "#":
                end = text.find("\n", self._i)
                self._i = n if end < 0 else end
            else:
                break

    def _document(self) -> None:
        table: tuple[str, ...] = ()
        while True:
            self._skip(newlines=True)
            if self._i >= len(self._text):
                return
            at = self._i
            if self._peek() == "[":
                double = self._peek(2) == "[["
                self._i += 2 if double else 1
                table = tuple(self._key())
                self._i += 2 if double else 1
                self._record(table, at)
            else:
                path = (*table, *self._key())
                self._record(path, at)
                self._skip(newlines=False)
                self._i += 1  # "="
                self._skip(newlines=False)
                self._value(path)

    def _key(self) -> Iterator[str]:
        while True:
            self._skip(newlines=False)
            c = self._peek()
            if c in "\"'":
                start = self._i
                self._string()
                yield tomllib.loads("k = " + self._text[start:self._i])["k"]
            else:
                m = _BARE_KEY.match(self._text, self._i)
                if m is None:
                    raise ValueError("not a key")
                self._i = m.end()
                yield m[0]
            self._skip(newlines=False)
            if self._peek() != ".":
                return
            self._i += 1

    def _value(self, path: tuple[str, ...]) -> None:
        c = self._peek()
        if c == "{":
            self._i += 1
            while True:
                self._skip(newlines=True)
                if self._peek() == "}":
                    self._i += 1
                    return
                at = self._i
                key = (*path, *self._key())
                self._record(key, at)
                self._skip(newlines=False)
                self._i += 1  # "="
                self._skip(newlines=False)
                self._value(key)
                self._skip(newlines=True)
                if self._peek() == ",":
                    self._i += 1
        elif c == "[":
            self._i += 1
            while True:
                self._skip(newlines=True)
                if self._peek() == "]":
                    self._i += 1
                    return
                self._value(path)
                self._skip(newlines=True)
                if self._peek() == ",":
                    self._i += 1
        elif c in "\"'":
            self._string()
        else:  # number, boolean, date-time (which may hold a space)
            m = _SCALAR.match(self._text, self._i)
            if m is None:
                raise ValueError("not a value")
            self._i = m.end()

    def _string(self) -> None:
        text, quote = self._text, self._peek()
        if self._peek(3) == quote * 3:
            self._i += 3
            while not text.startswith(quote * 3, self._i):
                self._i += 2 if quote == '"' and text[self._i] == "\\" else 1
            self._i += 3
            while self._peek() == quote:  # up to two quotes may end the content
                self._i += 1
        else:
            self._i += 1
            while text[self._i] != quote:
                self._i += 2 if quote == '"' and text[self._i] == "\\" else 1
            self._i += 1
