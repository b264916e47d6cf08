"""A report variant: one defense under one configuration.

Runs of one defense trained with different configurations must never be averaged together, so the report keys
them by this typed variant (hashable, so it keys the report's groups). Its text form "defense#digest" (the digest
is absent for the defense's only configuration) is spelled here only, by `format` and `slug` where it is written;
the report never reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass

SEPARATOR = "#"


@dataclass(frozen=True, order=True)
class Variant:
    defense: str
    digest: str = ""  # empty: the defense's only configuration in these results

    def format(self) -> str:
        return f"{self.defense}{SEPARATOR}{self.digest}" if self.digest else self.defense

    def slug(self) -> str:
        """For file and element names, where the separator is not allowed."""
        return f"{self.defense}_{self.digest}" if self.digest else self.defense
