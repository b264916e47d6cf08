"""A report variant: one defense under one configuration.

Runs of one defense trained with different configurations must never be averaged together, so the report keys
them by "defense#digest" (the digest is absent for the defense's only configuration). This module is the one
place that spells that string: `parse` at the boundary, then the typed fields.
"""

from __future__ import annotations

from dataclasses import dataclass

SEPARATOR = "#"


@dataclass(frozen=True)
class Variant:
    defense: str
    digest: str = ""  # empty: the defense's only configuration in these results

    @classmethod
    def parse(cls, key: str) -> Variant:
        defense, _, digest = key.partition(SEPARATOR)
        return cls(defense, digest)

    def format(self) -> str:
        return f"{self.defense}{SEPARATOR}{self.digest}" if self.digest else self.defense

    def slug(self) -> str:
        """For file and element names, where the separator is not allowed."""
        return f"{self.defense}_{self.digest}" if self.digest else self.defense


def defense_of(key: str) -> str:
    """The defense a variant key belongs to ("ades#1a2b" -> "ades")."""
    return Variant.parse(key).defense
