"""Typed name -> object registries with duplicate-name errors and "did you mean" suggestions.

One `Registry` per kind of thing (defenses, data sets, models, presets, attacks, benchmarks).
Objects register themselves with a decorator where they are defined, so adding a defense means
adding one file and never touching a dispatcher. A registry whose entries live in a plugin package
(the defenses in `methods/`) names it, and imports it on its first lookup: no caller needs an
`import methods` for its side effect, and `import harness` stays light.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from harness.core.errors import DuplicateNameError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, plugins: str | None = None):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._plugins = plugins  # a package whose import registers the entries; imported on first lookup

    def _load_plugins(self) -> None:
        """Import the plugin package once; registering (`add`) during that import does not come back here."""
        if self._plugins is not None:
            package, self._plugins = self._plugins, None
            try:
                importlib.import_module(package)
            except BaseException:
                self._plugins = package  # a failed import is retried (and fails loudly) on the next lookup
                raise

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name")` on a class or factory."""

        def decorate(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorate

    def add(self, name: str, obj: T) -> None:
        if name in self._entries:
            raise DuplicateNameError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        self._load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self._unknown_message(name)) from None

    def _unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._entries))})"

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load_plugins()
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._entries

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._entries)
