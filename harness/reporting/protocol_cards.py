"""Protocol cards: per method, each setting of its authors' protocol, what our runs used, and why.

A card is built from the `reference_protocol` entry of the run records (or, for records written
before that entry existed, from their spec and the defense's declaration, `harness.core.protocol`).
Values that differ between the method's runs are all listed, so a card never hides a mixed protocol.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from harness.core.protocol import NO_REFERENCE, run_protocol
from harness.reporting import reference
from harness.reporting.loading import Results, Run

MARK = "†"  # the Table 1 mark of a number whose runs depart from the authors' protocol


@dataclass(frozen=True)
class CardRow:
    setting: str
    reference: str
    ours: str
    why: str
    departs: bool | None  # None: the records do not say


@dataclass
class ProtocolCard:
    defense: str
    method: str
    source: str
    runs: int
    rows: list[CardRow] = field(default_factory=list)

    @property
    def departures(self) -> list[CardRow]:
        return [r for r in self.rows if r.departs]


def show(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def card_for(defense: str, runs: list[Run]) -> ProtocolCard:
    diffs = [run_protocol(r.record) for r in runs]
    card = ProtocolCard(defense, reference.method_label(defense), diffs[0]["source"], len(runs))
    if diffs[0]["source"] == NO_REFERENCE:
        return card
    for i, first in enumerate(diffs[0]["settings"]):
        rows = [d["settings"][i] for d in diffs if i < len(d["settings"])]
        values = list(dict.fromkeys(show(r["ours"]) for r in rows))
        flags = [r["departs"] for r in rows]
        departs = True if any(flags) else (None if any(f is None for f in flags) else False)
        card.rows.append(
            CardRow(
                first["setting"],
                show(first["reference"]),
                " | ".join(values) + (f" (differs across {len(rows)} runs)" if len(values) > 1 else ""),
                first["why"],
                departs,
            )
        )
    return card


def protocol_cards(results: Results) -> list[ProtocolCard]:
    """One card per defense with complete runs, in the report's method order."""
    by_defense: dict[str, list[Run]] = {}
    for run in results.runs:
        by_defense.setdefault(run.defense, []).append(run)
    return [card_for(d, by_defense[d]) for d in sorted(by_defense, key=reference.method_sort_key)]


def departure_settings(runs: list[Run]) -> list[str]:
    """Settings in which any of these runs departs from its authors' protocol (for Table 1's marks)."""
    names: dict[str, None] = {}
    for run in runs:
        for row in run_protocol(run.record)["settings"]:
            if row.get("departs"):
                names[f"{row['setting']} ({show(row['ours'])} vs {show(row['reference'])})"] = None
    return list(names)
