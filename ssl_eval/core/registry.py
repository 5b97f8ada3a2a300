"""A generic name -> object registry with "did you mean" and prefix families.

Two kinds of entries:
  * exact names (``pixels``, ``digits``, ``knn``), and
  * prefix families (``timm:<model>``, ``folder:<path>``) whose factory receives the part
    after the colon.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    help: str = ""


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise a UserError with close matches."""

    def __init__(self, kind: str, listing: str | None = None):
        """``kind`` names an entry in messages (``backbone``); ``listing`` is the command that
        lists them (``ssl-eval list backbones``), where one exists; otherwise an unknown name's
        message lists the known names itself."""
        self.kind = kind
        self.listing = listing
        self._exact: dict[str, Entry[T]] = {}
        self._prefix: dict[str, Entry[Callable[[str], T]]] = {}

    def register(self, name: str, obj: T, help: str = "") -> T:
        if name in self._exact:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._exact[name] = Entry(name, obj, help)
        return obj

    def register_prefix(self, prefix: str, factory: Callable[[str], T], help: str = "") -> None:
        """``prefix`` without the colon; ``factory(rest)`` builds the object for ``prefix:rest``."""
        self._prefix[prefix] = Entry(prefix, factory, help)

    def __contains__(self, name: str) -> bool:
        return name in self._exact

    def entries(self) -> Iterator[Entry[T]]:
        yield from self._exact.values()

    def prefixes(self) -> Iterator[Entry[Callable[[str], T]]]:
        yield from self._prefix.values()

    def names(self) -> list[str]:
        return list(self._exact)

    def get(self, name: str) -> T:
        if name in self._exact:
            return self._exact[name].obj
        head, sep, rest = name.partition(":")
        if sep and head in self._prefix:
            if not rest:
                raise UserError(
                    f"{self.kind} {name!r} needs something after the colon: "
                    f"{self._prefix[head].help or head + ':<name>'}"
                )
            return self._prefix[head].obj(rest)
        raise UserError(self._unknown_message(name))

    def _unknown_message(self, name: str) -> str:
        candidates = list(self._exact) + [p + ":" for p in self._prefix]
        close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
        if not close and ":" in name:
            close = difflib.get_close_matches(name.partition(":")[0] + ":", candidates, n=3)
        msg = f"unknown {self.kind} {name!r}."
        if close:
            msg += " Did you mean " + " or ".join(repr(c) for c in close) + "?"
        if self.listing:
            msg += f" Run `{self.listing}` to see all of them."
        else:
            msg += f" Known: {', '.join(candidates)}."
        return msg
