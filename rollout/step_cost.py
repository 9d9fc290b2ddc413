"""What one engine step costs on a given machine, for the makespan simulator (rollout/simulator.py): a profile.

A profile prices a step as forward + host:
- forward: seconds of one forward as a function of the new tokens in it, its sequences and the context they attend;
  `grid` is the embedded engine's own start-up probe (rollout/engine/cost_probe.py, the curve the budget plans
  with), `linear` is base + per token + per sequence + per context token (a GPU's memory-bound line, DAS-style);
- host: the engine's own bookkeeping per sequence per step (scheduling, batch building, sampling, commit). The
  drafter's and the budget's host time is not in the profile: the simulator runs the real code and times it.

Profiles are YAML (configs/profiles/), or `cpu`: this machine's probe, measured once and cached like the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

import yaml

from rollout.cost_model import CostModel

PROFILES_DIR = Path(__file__).resolve().parents[1] / "configs" / "profiles"
PROBE_CONTEXT = 128  # the context the start-up probe's sequences attend (cost_probe.py)


def ragged_sequences(lengths: list[int]) -> int:
    """Sequences with a draft, when a forward's draft lengths differ (0 when they are all equal)."""
    return sum(n > 0 for n in lengths) if min(lengths, default=0) != max(lengths, default=0) else 0


def padded_rows(lengths: list[int]) -> int:
    """The attention rows of a decoding forward whose drafts have these lengths: every sequence's row, padded to the
    longest draft (as the budget prices them, rollout/budget.py)."""
    return len(lengths) * (1 + max(lengths, default=0))


class ForwardCost(Protocol):
    """Seconds of one forward; `cost_model` is the same curve as the budget's t(M, B) (probed at PROBE_CONTEXT)."""

    def seconds(self, tokens: int, sequences: int, context: int, ragged: int = 0, rows: int = 0) -> float:
        """`ragged`: sequences with a draft when the forward's drafts differ in length (0 when they are equal);
        `rows`: the attention rows the drafts pad to (padded_rows; at most `tokens` when nothing is padded)."""
        ...

    def cost_model(self) -> CostModel: ...


@dataclass(frozen=True)
class LinearForward:
    """base + per_token x tokens + per_sequence x sequences + per_context_token x context tokens attended (+ per
    drafted sequence of a ragged forward: 0 for varlen attention, as vLLM's)."""

    base_s: float
    per_token_s: float
    per_sequence_s: float = 0.0
    per_context_token_s: float = 0.0
    per_ragged_seq_s: float = 0.0

    def seconds(self, tokens: int, sequences: int, context: int, ragged: int = 0, rows: int = 0) -> float:
        # Varlen attention (vLLM's) pads nothing: `rows` is not priced.
        per_item = self.per_token_s * tokens + self.per_sequence_s * sequences + self.per_context_token_s * context
        return self.base_s + per_item + self.per_ragged_seq_s * ragged

    def cost_model(self) -> CostModel:
        # The grid a start-up probe would measure on this line (B sequences of PROBE_CONTEXT, k tokens each).
        return CostModel.from_timings(
            {(b, k): self.seconds(b * k, b, b * PROBE_CONTEXT) for b in (1, 4, 16, 64, 256) for k in (1, 2, 4, 8, 16)}
        )


@dataclass(frozen=True)
class GridForward:
    """scale x the probe's t(M', B) at PROBE_CONTEXT, + per_context_token_s for each context token beyond it, +
    per_ragged_seq_s for each drafted sequence of a forward whose drafts differ in length (the embedded engine then
    splits attention and copies caches). M' is the forward's tokens plus its padded rows at the probe's padded price,
    as the budget prices a step. The terms besides the grid are fitted to real steps (engine_profile.py)."""

    grid: CostModel
    scale: float = 1.0
    per_context_token_s: float = 0.0
    per_ragged_seq_s: float = 0.0

    def seconds(self, tokens: int, sequences: int, context: int, ragged: int = 0, rows: int = 0) -> float:
        return (
            self.scale * self.grid(self.priced_tokens(tokens, sequences, rows), sequences)
            + self.per_context_token_s * (context - PROBE_CONTEXT * sequences)
            + self.per_ragged_seq_s * ragged
        )

    def priced_tokens(self, tokens: int, sequences: int, rows: int = 0) -> float:
        """The tokens the grid is read at: `tokens` plus the rows padded beyond them at the probe's price."""
        return tokens + self.grid.padded_price(sequences) * max(rows - tokens, 0)

    def cost_model(self) -> CostModel:
        return self.grid


def _seconds(key: str, value) -> float:
    """A non-negative number (YAML 1.1 reads 1e-06, without a dot, as a string: take it as the number it spells)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{key} must be a number, got {value!r}") from None
    if not number >= 0:
        raise TypeError(f"{key} must be at least 0, got {value!r}")
    return number


def _linear(spec: dict) -> ForwardCost:
    return LinearForward(**{k: _seconds(k, v) for k, v in spec.items()})


def _grid(spec: dict) -> ForwardCost:
    if not isinstance(spec.get("grid"), dict):
        raise TypeError("grid must map batch sizes to [[tokens, seconds], ...]")
    terms = {k: _seconds(k, v) for k, v in spec.items() if k != "grid"}
    return GridForward(CostModel(spec["grid"]), **terms)


HOST_KEYS = ("engine_us_per_seq_step", "engine_us_per_step", "engine_us_per_accepted")
FORWARD_KINDS: dict[str, Callable[[dict], ForwardCost]] = {"linear": _linear, "grid": _grid}


@dataclass(frozen=True)
class Profile:
    name: str
    forward: ForwardCost
    engine_us_per_seq_step: float = 0.0  # the engine's host bookkeeping per sequence per forward
    engine_us_per_step: float = 0.0  # and per forward
    engine_us_per_accepted: float = 0.0  # and per accepted draft token (one more token drawn and committed)
    meta: dict = field(default_factory=dict)  # device, model, engine, checks: what the profile describes

    def step_seconds(
        self, tokens: int, sequences: int, context: int, accepted: int = 0, ragged: int = 0, rows: int = 0
    ) -> float:
        """One forward plus the engine's host time for it (the drafter's and budget's are timed by the simulator):
        `tokens` fed, over `sequences` attending `context` cached tokens in all, `accepted` draft tokens, `ragged`
        drafted sequences when the drafts differ in length, `rows` the attention rows they pad to (padded_rows)."""
        host = (
            self.engine_us_per_step + self.engine_us_per_seq_step * sequences + self.engine_us_per_accepted * accepted
        )
        return self.forward.seconds(tokens, sequences, context, ragged, rows) + 1e-6 * host

    def scaled(self, factor: float) -> "Profile":
        """This profile on the machine run `factor` times slower: every term in seconds scaled, forward and host
        (the grid through its `scale`)."""
        if not factor > 0:
            raise ValueError(f"a profile's speed factor must be above 0, got {factor!r}")
        terms = {k: v * factor for k, v in vars(self.forward).items() if isinstance(v, (int, float))}
        host = {k: getattr(self, k) * factor for k in HOST_KEYS}
        return replace(self, forward=replace(self.forward, **terms), **host)

    @classmethod
    def from_dict(cls, data: dict, source: str = "profile") -> "Profile":
        if not isinstance(data, dict) or not isinstance(data.get("forward"), dict):
            raise ValueError(f"{source}: a profile needs a 'forward' mapping (kind: linear | grid)")
        spec = dict(data["forward"])
        kind = spec.pop("kind", "linear")
        if kind not in FORWARD_KINDS:
            raise ValueError(f"{source}: forward.kind must be one of {', '.join(FORWARD_KINDS)}, got {kind!r}")
        try:
            forward = FORWARD_KINDS[kind](spec)
        except TypeError as exc:
            raise ValueError(f"{source}: forward ({kind}): {exc}") from exc
        host = data.get("host") or {}
        meta = {k: v for k, v in data.items() if k not in ("name", "forward", "host")}
        unknown = set(host) - set(HOST_KEYS)
        if unknown:
            raise ValueError(f"{source}: host takes {', '.join(HOST_KEYS)}; not {sorted(unknown)}")
        try:
            per_seq, per_step, per_accepted = (_seconds(k, host.get(k, 0)) for k in HOST_KEYS)
        except TypeError as exc:
            raise ValueError(f"{source}: host: {exc}") from exc
        return cls(str(data.get("name", source)), forward, per_seq, per_step, per_accepted, meta)

    def to_dict(self) -> dict:
        if isinstance(self.forward, GridForward):
            fwd = {"kind": "grid", **self.forward.__dict__, "grid": self.forward.grid.to_json()}
        else:
            fwd = {"kind": "linear", **self.forward.__dict__}
        host = dict(zip(HOST_KEYS, (self.engine_us_per_seq_step, self.engine_us_per_step, self.engine_us_per_accepted)))
        return {"name": self.name, **self.meta, "forward": fwd, "host": host}


def load_profile(spec: str | Path, cpu: Callable[[], Profile] | None = None) -> Profile:
    """A YAML file, a profile's name under configs/profiles/, or 'cpu' (this machine's, from `cpu()`)."""
    text = str(spec)
    if text == "cpu":
        if cpu is None:
            raise ValueError(
                "the cpu profile is measured on this machine: pass rollout.engine_profile.measure_engine_profile"
            )
        return cpu()
    path = Path(text)
    if not path.exists():
        path = PROFILES_DIR / f"{text}.yaml"
    if not path.exists():
        known = ", ".join(["cpu"] + sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no cost profile {text!r}: give a YAML file or one of {known}")
    return Profile.from_dict(yaml.safe_load(path.read_text()), str(path))
