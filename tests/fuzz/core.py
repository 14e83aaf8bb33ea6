"""What every fuzzer shares: hostile values, findings with their reproducers, a time budget."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Attribute values a server reads from strangers: '²' passes str.isdigit() and then breaks
# int(); 5,000 digits pass isdigit() and break int() (past 4,300 digits); negatives, empty,
# blanks, other scripts' digits, very long, odd unicode (bidi overrides, combining marks,
# zero width, astral planes), XML-special characters (escaped by the serialiser).
# Values str.isdigit() accepts and int() refuses: the defect class of issue 20, tried often.
DIGIT_TRAPS = ("²", "1²", "²1", "³", "¹", "1" * 5000, "9" * 4301)
NUMBERS_HOSTILE = (
    *DIGIT_TRAPS, "².0", "٣", "１", "Ⅻ", "-5", "-1", "", " ", " 1", "1 ", "+1", "1.5", "1e3",
    "0x10", "NaN", "9" * 30, "-" + "9" * 30, "0" * 100 + "1",
)
TEXT_HOSTILE = (
    "a" * 10000, "\u202e\u202dx", "e\u0301\u0301\u0301", "\u200b", "\U0001F600" * 50, "\ufeff",
    "<&>'\"", "]]>", "\t\n\r", "\U00010000", "\ud7ff", "x" * 1024, "ß", "İ", "ǅ",
)
JIDS_HOSTILE = (
    "@a.test", "a@", "a@a.test/", "a@@a.test", "a" * 1024 + "@a.test", "a@" + "b" * 1024,
    "a@a.test/" + "r" * 1024, "a b@a.test", "a@a..test", "a@[::1", "a@-a.test", "a@.a.test",
    "A@A.TEST", "ⓐ@a.test", "a@xn--.test", "a@1.2.3.4.5", "a@a.test:5222", 'a"@a.test',
    "a@a.test/\u202e", "/r", "a@/r", "\u0130@a.test", "a@a.test.", "a@" + "b." * 200 + "test",
    "a@muc.a.test/" + "\u0301", "fuzzroom@muc.a.test/" + "n" * 1100,
)
HOSTILE = NUMBERS_HOSTILE + TEXT_HOSTILE + JIDS_HOSTILE

log = logging.getLogger("presenced.fuzz")


@dataclass
class Finding:
    fuzzer: str
    kind: str          # traceback, internal-server-error, no-answer, crash, invalid-number-ignored, ...
    signature: str     # what makes two findings the same defect
    reproducer: str    # the minimal input (stanza, bytes as a Python literal, request)
    detail: str = ""

    def line(self) -> str:
        return (f"[{self.fuzzer}] {self.kind}: {self.signature}\n    reproducer: "
                f"{self.reproducer[:600]}\n    detail: {self.detail[:400]}")


@dataclass
class Report:
    cases: dict[str, int] = field(default_factory=dict)
    findings: dict[str, Finding] = field(default_factory=dict)  # signature -> first finding

    def count(self, fuzzer: str, n: int = 1) -> None:
        self.cases[fuzzer] = self.cases.get(fuzzer, 0) + n

    def add(self, finding: Finding) -> bool:
        key = f"{finding.fuzzer}|{finding.kind}|{finding.signature}"
        if key in self.findings:
            return False
        self.findings[key] = finding
        return True

    def summary(self) -> str:
        lines = [f"cases: {sum(self.cases.values())} "
                 + " ".join(f"{k}={v}" for k, v in sorted(self.cases.items())),
                 f"findings: {len(self.findings)}"]
        lines += [f.line() for f in self.findings.values()]
        return "\n".join(lines)


class Budget:
    """Seconds of wall-clock time, counted from the first case, and an optional case cap."""

    def __init__(self, seconds: float, max_cases: int | None = None) -> None:
        self.seconds = seconds
        self.deadline: float | None = None
        self.max_cases = max_cases
        self.used = 0

    def more(self) -> bool:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.seconds
        if self.max_cases is not None and self.used >= self.max_cases:
            return False
        self.used += 1
        return time.monotonic() < self.deadline

    def overdue(self) -> bool:
        """Past the deadline by more than a tenth of the budget: stop minimising findings."""
        return self.deadline is not None and \
            time.monotonic() > self.deadline + self.seconds / 10


def shrink_list(items: list[object], still_fails: Callable[[list[object]], bool],
                budget: Budget | None = None) -> list[object]:
    """Delta debugging, simplified: drop chunks, then single items, while it still fails."""
    chunk = max(1, len(items) // 2)
    while chunk >= 1:
        i = 0
        while i < len(items):
            if budget is not None and budget.overdue():
                return items
            candidate = items[:i] + items[i + chunk:]
            if candidate != items and still_fails(candidate):
                items = candidate
            else:
                i += chunk
        if chunk == 1:
            break
        chunk //= 2
    return items


def pick(rng: random.Random, seq: tuple[str, ...] | list[str]) -> str:
    return seq[rng.randrange(len(seq))]


def bad_number(rng: random.Random) -> str:
    """An invalid number for an attribute read as one: half the time a digit trap."""
    return pick(rng, DIGIT_TRAPS if rng.random() < 0.5 else NUMBERS_HOSTILE)
