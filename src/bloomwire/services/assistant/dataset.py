"""The labelled customer lines (``questions.tsv``) and their fixed 70/30 split.

The held-out part is chosen by a seeded hash of each line, never by looking at it: rules are tuned
on the rest only, and the held-out accuracy is reported on its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Final

from bloomwire.services.assistant.intents import Intent

#: Seed of the split; changing it gives another held-out part (the reported one uses this).
SEED: Final = "bloomwire-assistant-2026"
HELD_OUT_SHARE: Final = 0.3


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled line: ``group`` is ``en``, ``zh`` or ``mixed``."""

    group: str
    intent: Intent
    text: str


def load() -> list[Example]:
    """Every labelled line of the package's ``questions.tsv``, in file order."""
    raw = resources.files(__package__).joinpath("questions.tsv").read_text(encoding="utf-8")
    out: list[Example] = []
    for line in raw.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        group, label, text = line.split("\t", 2)
        out.append(Example(group, Intent(label), text))
    return out


def _rank(example: Example, seed: str) -> str:
    return hashlib.sha256(f"{seed}\t{example.text}".encode()).hexdigest()


def split(examples: list[Example], seed: str = SEED) -> tuple[list[Example], list[Example]]:
    """(tuning, held out): the held-out part is the 30 % with the lowest seeded hash."""
    ranked = sorted(examples, key=lambda e: _rank(e, seed))
    cut = round(len(ranked) * HELD_OUT_SHARE)
    held = {id(e) for e in ranked[:cut]}
    return [e for e in examples if id(e) not in held], [e for e in examples if id(e) in held]
