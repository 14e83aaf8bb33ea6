"""Config errors: each names file, line and key (``conf/x.toml:12: [listen] c2s: ...``)."""

from __future__ import annotations


class ConfigError(Exception):
    """One problem: ``conf/x.toml:12: [listen] c2s: expected a list of "host:port" strings``.

    ``key`` is dotted (``listen.c2s``); ``line`` is 0 when the problem has none (unreadable file).
    ``problem`` says what is wrong when "expected ..." alone would not.
    """

    def __init__(self, file: str, line: int, key: str, expected: str,
                 problem: str | None = None) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.expected = expected
        self.problem = problem
        super().__init__(self._format())

    def _format(self) -> str:
        what = f"expected {self.expected}"
        return f"{where_text(self.file, self.line, self.key)}: " + (
            f"{self.problem}; {what}" if self.problem else what)


class ConfigErrors(ConfigError):
    """Every problem found in one file; ``str()`` gives one line each. Its own attributes are
    those of the first problem, so ``except ConfigError`` sees a sensible single error too."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.file, first.line, first.key, first.expected, first.problem)
        self.errors = errors
        self.args = ("\n".join(str(e) for e in errors),)

    def __str__(self) -> str:
        return str(self.args[0])


def where_text(file: str, line: int, key: str) -> str:
    if not key:
        return f"{file}:{line}"
    table, _, name = key.rpartition(".")
    return f"{file}:{line}: [{table}] {name}" if table else f"{file}:{line}: {name}"

