"""Names already found valid, so that a hot path checks each name once."""

from __future__ import annotations

__all__ = ["KnownNames"]

# Forgotten all at once past this many: a sender or consumer uses the same few names
# over and over, and a flood of new ones costs a check each, as without the set.
KEPT = 10_000


class KnownNames(set[str]):
    """A set of names that passed their check (``name in known`` stays a set lookup)."""

    def remember(self, name: str) -> None:
        if len(self) >= KEPT:
            self.clear()
        self.add(name)
