"""What a config field takes: each rule is a type and its allowed values at once, and gives both
the check (`ok`) and the words of the error line (`<field> must be <what>`). jaxcrit/run/fields.py
gives every field its rule."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def distinct(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and len(set(v)) == len(v)


class Rule:
    """What a field takes: `ok(value)`, and `what()`, the words for it in an error line."""

    def ok(self, v: Any) -> bool:
        raise NotImplementedError

    def what(self) -> str:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Flag(Rule):
    def ok(self, v: Any) -> bool:
        return isinstance(v, bool)

    def what(self) -> str:
        return "True or False"


@dataclasses.dataclass(frozen=True)
class Int(Rule):
    """An integer >= lo."""
    lo: int

    def ok(self, v: Any) -> bool:
        return is_int(v) and v >= self.lo

    def bound(self) -> str:
        return f">= {self.lo}"

    def what(self) -> str:
        return f"an integer {self.bound()}"


@dataclasses.dataclass(frozen=True)
class Num(Rule):
    """A finite number inside `interval`, written as the error line says it: "> 0", ">= 0",
    "(0, 1]", "(0, 1)"; "" takes any."""
    interval: str = ""

    def ok(self, v: Any) -> bool:
        s = self.interval
        if not is_num(v):
            return False
        if s.startswith(">="):
            return v >= float(s[2:])
        if s.startswith(">"):
            return v > float(s[1:])
        if s:
            lo, hi = (float(x) for x in s[1:-1].split(","))
            return (v > lo if s[0] == "(" else v >= lo) and (v < hi if s[-1] == ")" else v <= hi)
        return True

    def bound(self) -> str:
        return self.interval if self.interval.startswith(">") else f"in {self.interval}"

    def what(self) -> str:
        return self.bound() if self.interval else "a number"


@dataclasses.dataclass(frozen=True)
class Choice(Rule):
    """One of a few names."""
    options: Iterable[str]

    def ok(self, v: Any) -> bool:
        return isinstance(v, str) and v in self.options

    def what(self) -> str:
        *first, last = self.options
        return f"{', '.join(first)} or {last}" if first else last


@dataclasses.dataclass(frozen=True)
class Names(Rule):
    """A tuple of distinct names among the options (`noun`: what they are, for the error line)."""
    options: Iterable[str]
    noun: str = "names"
    nonempty: bool = False

    def ok(self, v: Any) -> bool:
        return distinct(v) and all(x in self.options for x in v) and (len(v) > 0 or not self.nonempty)

    def what(self) -> str:
        return f"{'a non-empty tuple of ' if self.nonempty else ''}distinct {self.noun} among {', '.join(self.options)}"


@dataclasses.dataclass(frozen=True)
class Each(Rule):
    """A tuple whose every item is an Int or a Num (`noun`: what the items are)."""
    item: Int | Num
    noun: str
    nonempty: bool = False

    def ok(self, v: Any) -> bool:
        return isinstance(v, (tuple, list)) and all(self.item.ok(x) for x in v) and (len(v) > 0 or not self.nonempty)

    def what(self) -> str:
        return f"a {'non-empty ' if self.nonempty else ''}tuple of {self.noun} {self.item.bound()}"


@dataclasses.dataclass(frozen=True)
class Pred(Rule):
    """Anything else: a predicate and its words."""
    check: Callable[[Any], bool]
    words: str

    def ok(self, v: Any) -> bool:
        return self.check(v)

    def what(self) -> str:
        return self.words
