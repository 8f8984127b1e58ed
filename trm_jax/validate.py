"""The domains of config fields: one checker per kind of setting, shared by every config.

Each frozen config declares its fields' domains once, as data::

    DOMAINS = {"epochs": Int(0), "learning_rate": Float(0, open_lo=True), "b1": Float(0, 1, open_hi=True)}

and calls :func:`check_fields` first in ``__post_init__``. A value of the wrong type (a bool
or a string where a number is meant, a bare number where a tuple is meant) or outside its
domain is then a :class:`~trm_jax.errors.ConfigError` whose ``field`` is exactly that field,
with a one-line message naming the value and what is allowed, before any compute. Every
number is bounded: integers by int64 (what reaches numpy/JAX; a larger count overflows or
never ends), floats by float32's finite range (the programs compute in float32, where a
larger value is ``inf``). Because the domains are data, tests generate a value just outside
each one (:meth:`Int.outside`, ``tests/test_cli_flags.py``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from trm_jax.errors import ConfigError

INT64_MAX = 2**63 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _shown(value: Any) -> str:
    natural = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))
    return repr(value) if natural else f"{value!r} ({type(value).__name__})"


def _integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class Int:
    """An integer (never a bool) in ``lo..hi``; ``none``: or ``None``."""

    lo: int = 0
    hi: int = INT64_MAX
    none: bool = False

    def ok(self, value: Any) -> bool:
        return (value is None and self.none) or (_integer(value) and self.lo <= value <= self.hi)

    def describe(self) -> str:
        text = (f"an integer >= {self.lo}" if self.hi == INT64_MAX
                else f"an integer in {self.lo}..{self.hi}")
        return text + (" or None" if self.none else "")

    def outside(self) -> list[Any]:
        """Values just outside the domain (for tests)."""
        return [self.lo - 1] + ([self.hi + 1] if self.hi < INT64_MAX else [])


@dataclasses.dataclass(frozen=True)
class Float:
    """A real number (int or float, never a bool), finite in float32, in ``[lo, hi]``
    (``open_lo``/``open_hi``: that end excluded); ``none``: or ``None``."""

    lo: float = -FLOAT32_MAX
    hi: float = FLOAT32_MAX
    open_lo: bool = False
    open_hi: bool = False
    none: bool = False

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.none
        if not _real(value) or not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            return False
        return ((value > self.lo) if self.open_lo else (value >= self.lo)) and (
            (value < self.hi) if self.open_hi else (value <= self.hi))

    def describe(self) -> str:
        lo = None if self.lo == -FLOAT32_MAX else ("> " if self.open_lo else ">= ") + f"{self.lo:g}"
        hi = None if self.hi == FLOAT32_MAX else ("< " if self.open_hi else "<= ") + f"{self.hi:g}"
        if lo and hi:
            bounds = (f" and in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}"
                      f"{')' if self.open_hi else ']'}")
        else:
            bounds = f" and {lo or hi}" if lo or hi else ""
        return f"finite{bounds}" + (" or None" if self.none else "")

    def outside(self) -> list[Any]:
        out = [math.nan]
        if self.lo != -FLOAT32_MAX:
            out.append(self.lo if self.open_lo else float(np.nextafter(self.lo, -math.inf)))
        if self.hi != FLOAT32_MAX:
            out.append(self.hi if self.open_hi else float(np.nextafter(self.hi, math.inf)))
        return out


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of ``allowed``."""

    allowed: tuple[Any, ...]
    none: bool = False

    def ok(self, value: Any) -> bool:
        return (value is None and self.none) or (
            isinstance(value, (str, int)) and not isinstance(value, bool) and value in self.allowed)

    def describe(self) -> str:
        return f"one of {tuple(self.allowed)}" + (" or None" if self.none else "")

    def outside(self) -> list[Any]:
        return ["abc"]


@dataclasses.dataclass(frozen=True)
class Str:
    """Any string (a path, an address, a name checked later against the model or data)."""

    none: bool = False

    def ok(self, value: Any) -> bool:
        return (value is None and self.none) or isinstance(value, str)

    def describe(self) -> str:
        return "a string" + (" or None" if self.none else "")

    def outside(self) -> list[Any]:
        return []


@dataclasses.dataclass(frozen=True)
class Bool:
    """``True`` or ``False`` (not 0/1, not a string)."""

    def ok(self, value: Any) -> bool:
        return isinstance(value, (bool, np.bool_))

    def describe(self) -> str:
        return "True or False"

    def outside(self) -> list[Any]:
        return []


@dataclasses.dataclass(frozen=True)
class Tuple:
    """A tuple (a list is taken as one; a bare value is not) of ``item`` values, at least
    ``min_len`` of them (at most ``max_len``), ``distinct``: each once; ``none``: or ``None``."""

    item: Any
    min_len: int = 1
    max_len: int | None = None
    distinct: bool = False
    none: bool = False

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.none
        if not isinstance(value, (tuple, list)):
            return False
        sized = self.min_len <= len(value) <= (self.max_len or len(value))
        return sized and all(self.item.ok(v) for v in value) and (
            not self.distinct or len(set(value)) == len(value))

    def describe(self) -> str:
        n = (f"{self.min_len} " if self.max_len == self.min_len else
             f"{self.min_len}..{self.max_len} " if self.max_len else
             "" if self.min_len == 0 else f">= {self.min_len} ")
        return (f"a tuple of {n}{'distinct ' if self.distinct else ''}values, each "
                f"{self.item.describe()}" + (" (or None)" if self.none else ""))

    def outside(self) -> list[Any]:
        return [(v,) for v in self.item.outside()]


@dataclasses.dataclass(frozen=True)
class Instance:
    """A nested config (or any object) of class ``cls`` (``None`` in its place fails early,
    not as an ``AttributeError`` deep inside)."""

    cls: type

    def ok(self, value: Any) -> bool:
        return isinstance(value, self.cls)

    def describe(self) -> str:
        return f"a {self.cls.__name__}"

    def outside(self) -> list[Any]:
        return []


Domain = Int | Float | Choice | Str | Bool | Tuple | Instance


def check(field: str, value: Any, domain: Domain) -> Any:
    """``value`` if it is in ``domain`` (a list as a tuple); else :class:`ConfigError`
    ``<field> must be <domain>, got <value>`` with ``field`` set."""
    if not domain.ok(value):
        why = ""
        if _integer(value) and abs(value) > INT64_MAX:
            why = " (beyond int64)"
        elif _real(value) and math.isfinite(value) and abs(value) > FLOAT32_MAX:
            why = " (beyond float32's range, where the programs compute: inf)"
        if isinstance(domain, Choice) and not domain.none:  # check_choice's wording
            raise ConfigError(f"unknown {field} {value!r}; allowed: {tuple(domain.allowed)}",
                              field=field)
        bare = isinstance(domain, Tuple) and not isinstance(value, (tuple, list))
        shown = f"{value!r} ({type(value).__name__})" if bare else repr(value) if isinstance(
            domain, Tuple) else _shown(value)
        raise ConfigError(f"{field} must be {domain.describe()}, got {shown}{why}", field=field)
    return tuple(value) if isinstance(value, list) else value


def check_fields(config: Any, domains: Mapping[str, Domain] | None = None) -> None:
    """Checks every field of ``config`` named in ``domains`` (default: the class's
    ``DOMAINS``); a list given for a tuple field is stored as a tuple (configs stay hashable)."""
    for name, domain in (type(config).DOMAINS if domains is None else domains).items():
        value = getattr(config, name)
        checked = check(name, value, domain)
        if checked is not value:
            object.__setattr__(config, name, checked)


#: Shared domains (the same setting means the same thing everywhere).
POSITIVE = Float(0, open_lo=True)          # learning rates, step sizes
NONNEGATIVE = Float(0)                     # loss weights
DECAY = Float(0, 1, open_hi=True)          # Adam's b1/b2, momentum: optax needs [0, 1)
COUNT = Int(1)                             # steps, tasks, batch sizes
