"""One registry type for everything a user can add by name: tiers, datasets, generator families,
algorithms (in the spirit of torchvision's `register_model` / `get_model` / `list_models`).

A module creates a `Registry`, registers its built-in entries at import, then calls
`seal_builtins()`. From then on the two kinds of name behave differently when registered again:

* a name registered by user code replaces the earlier entry (in place: the listing order stays),
  so a script or notebook cell that registers a tier can run twice in one process;
* a built-in name is refused with a GeflError ("tier 'cnn3' is built in; pick another name"):
  replacing gefl's own entry would quietly change what every config naming it runs.

Before `seal_builtins()` a duplicate name is refused as well: two built-ins of one name are a bug.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from gefl.errors import GeflError, unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, in registration order."""

    def __init__(self, kind: str, plural: str | None = None) -> None:
        """`kind` names an entry in messages ("tier", "generator family"); `plural` is its plural
        when adding an "s" is wrong ("generator families")."""
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._entries: dict[str, T] = {}
        self._builtins: frozenset[str] = frozenset()
        self._sealed = False

    def register(self, name: str, value: T) -> None:
        """Add `value` under `name`; a user name registered again is replaced, a built-in refused."""
        if not isinstance(name, str) or not name:
            raise GeflError(f"a {self.kind} is registered under a non-empty string, got {name!r}")
        if name in self._builtins:
            raise GeflError(f"{self.kind} {name!r} is built in; pick another name")
        if not self._sealed and name in self._entries:
            raise GeflError(f"built-in {self.kind} {name!r} is registered twice")
        self._entries[name] = value

    def seal_builtins(self) -> None:
        """Mark every name registered so far as built in: it can no longer be replaced.

        The owning module calls this once, after its own registrations."""
        self._builtins = frozenset(self._entries)
        self._sealed = True

    def get(self, name: str) -> T:
        """The entry registered under `name`; a GeflError listing the registered names if none is."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name from a config file
            raise unknown_name(self.kind, name, self._entries, plural=self.plural) from None

    def names(self) -> list[str]:
        """Registered names, in registration order (built-ins first)."""
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def is_builtin(self, name: str) -> bool:
        return name in self._builtins

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
