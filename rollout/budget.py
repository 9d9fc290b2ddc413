"""How many tokens to draft for each running sequence at each step.

`fixed:K` drafts up to K tokens for every sequence; `off` drafts nothing (plain decoding through the same engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Budget(Protocol):
    def draft_lengths(self, num_running: int, wanted: list[int]) -> list[int]:
        """For each running sequence, how many draft tokens to verify, at most wanted[i] (its room left)."""
        ...


@dataclass
class FixedBudget:
    k: int

    def draft_lengths(self, num_running: int, wanted: list[int]) -> list[int]:
        return [min(self.k, w) for w in wanted]


def parse_budget(spec: str) -> Budget:
    """'off' | 'fixed:K'."""
    text = str(spec).strip().lower()
    if text == "off":
        return FixedBudget(0)
    if text.startswith("fixed:"):
        value = text.split(":", 1)[1]
        if value.isdigit():
            return FixedBudget(int(value))
    raise ValueError(f"speculation.budget must be 'off' or 'fixed:K' with K >= 0, got {spec!r}")
