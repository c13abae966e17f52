"""User-facing errors.

Anything a user can cause (a typo in a config, a missing dataset, an unknown tier) raises
:class:`GeflError`. The command line prints its message as one paragraph and exits non-zero,
with no traceback; anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class GeflError(Exception):
    """An error caused by input the user can fix; the message says what and how."""


def unknown_name(kind: str, name: object, valid: Iterable[str], plural: str | None = None) -> GeflError:
    """The one wording for 'no such X' so every registry fails the same way; `plural` where
    adding an "s" to `kind` is wrong ("generator families")."""
    choices = ", ".join(sorted(valid))
    return GeflError(f"unknown {kind} {name!r}; valid {plural or kind + 's'} are: {choices}")
