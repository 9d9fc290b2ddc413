"""An alarm for the silent failure of speculative rollouts: the drafter goes stale after a weight sync.

Nothing breaks when a drafter stops predicting the policy (a refresh that failed, a policy that moved away from what
the drafter learned): rollouts stay exact, only slower, and acceptance can sit at 0 for the rest of a run. Each
engine keeps the acceptance (accepted / drafted tokens) of the rollouts it finishes, per policy version, and compares
the current version's with the last earlier version that drafted enough: once the current one has drafted
`min_drafted` tokens and accepts less than `ratio` of the earlier rate, it logs one warning naming the drafter and
the version. The figures are in the engine's counters (`drafter_*`), hence in every service's `stats()`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MIN_DRAFTED = 256  # drafted tokens a version needs before its acceptance is compared (or compared against)
COLLAPSE_RATIO = 0.5  # a collapse: below half the previous version's acceptance


def drafter_name(drafter) -> str:
    """The drafter's registered name (what speculation.drafter says), else its class name."""
    from drafters.base import DRAFTERS

    kind = type(drafter)
    return next((name for name, factory in DRAFTERS.items() if factory is kind), kind.__name__)


@dataclass
class _Tally:
    drafted: int = 0
    accepted: int = 0

    @property
    def rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class DrafterHealth:
    drafter: str = "drafter"
    min_drafted: int = MIN_DRAFTED
    ratio: float = COLLAPSE_RATIO
    version: int | None = None  # the policy version now being tallied
    current: _Tally = field(default_factory=_Tally)
    previous_version: int | None = None  # the last earlier version that drafted at least min_drafted tokens
    previous: _Tally | None = None
    collapsed_versions: list[int] = field(default_factory=list)
    last_alarm: str | None = None

    def record(self, version: int, drafted: int, accepted: int) -> None:
        """One finished speculated rollout of `version`."""
        if version != self.version:
            if self.version is not None and version < self.version:
                return  # a straggler of an older version: the comparison has moved on
            if self.version is not None and self.current.drafted >= self.min_drafted:
                self.previous_version, self.previous = self.version, self.current
            self.version, self.current = version, _Tally()
        self.current.drafted += drafted
        self.current.accepted += accepted
        if self.collapsed and version not in self.collapsed_versions:
            self.collapsed_versions.append(version)
            self.last_alarm = self.alarm()
            log.warning(self.last_alarm)

    @property
    def collapsed(self) -> bool:
        if self.previous is None or self.current.drafted < self.min_drafted or not self.previous.rate:
            return False
        return self.current.rate < self.ratio * self.previous.rate

    def alarm(self) -> str:
        return (
            f"drafter {self.drafter!r}: acceptance collapsed at policy version {self.version}: "
            f"{self.current.rate:.3f} of {self.current.drafted} drafted tokens accepted, against "
            f"{self.previous.rate:.3f} at version {self.previous_version} (below {self.ratio:g} of it); the drafter "
            "is likely stale (did its refresh fail, or has the policy moved away from what it learned?)"
        )

    def figures(self) -> dict:
        """What the counters report: the current version's acceptance, the one it is compared with, the alarm."""
        return {
            "drafter": self.drafter,
            "drafter_version": self.version,
            "drafter_drafted": self.current.drafted,
            "drafter_acceptance": self.current.rate,
            "drafter_previous_version": self.previous_version,
            "drafter_previous_acceptance": None if self.previous is None else self.previous.rate,
            "drafter_collapsed": self.collapsed,
            "drafter_collapsed_versions": list(self.collapsed_versions),
            "drafter_alarm": self.last_alarm,
        }


def merged(rows: list[dict]) -> dict:
    """The figures of several replicas (stats() rows) as one: acceptances weighted by drafted tokens, collapsed
    when any replica's is."""
    rows = [r for r in rows if "drafter_acceptance" in r]
    drafted = sum(r["drafter_drafted"] for r in rows)
    previous = [r for r in rows if r["drafter_previous_acceptance"] is not None]
    return {
        "drafter_acceptance": sum(r["drafter_acceptance"] * r["drafter_drafted"] for r in rows) / drafted
        if drafted
        else None,
        "drafter_previous_acceptance": sum(r["drafter_previous_acceptance"] for r in previous) / len(previous)
        if previous
        else None,
        "drafter_collapsed": any(r["drafter_collapsed"] for r in rows),
    }
