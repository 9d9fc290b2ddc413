"""How long a running rollout is expected to go on, from its prompt's recorded rollouts.

RL samples every prompt several times per step and again in later steps, so a prompt's earlier rollouts are its
length class (DAS): a prompt whose rollouts ran long will probably run long again. The budget gives the sequences
expected to run longest their drafts first, since they set a step's makespan.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LengthClasses:
    default: float = 256.0  # expected length of a rollout whose prompt has no recorded lengths
    keep: int = 64  # the latest lengths kept per prompt
    lengths: dict[str, list[int]] = field(default_factory=dict)  # prompt key -> recorded rollout lengths

    def remaining(self, prompt_key: str | None, generated: int) -> float:
        """Tokens a rollout of this prompt that has generated `generated` is expected still to emit (>= 1)."""
        recorded = self.lengths.get(prompt_key or "", [])
        total = sum(recorded) / len(recorded) if recorded else self.default
        # Beyond the recorded mean, a sequence is in the tail: expect it to run about as long again as it has.
        return max(total - generated, 0.5 * max(generated, 1.0), 1.0)

    def add(self, prompt_key: str | None, length: int) -> None:
        if prompt_key is not None:
            self.lengths.setdefault(prompt_key, []).append(length)
            del self.lengths[prompt_key][: -self.keep]

    def load(self, history) -> None:
        """The lengths of the rollouts in the history's window, instead of what was known."""
        if history is None or not len(history):
            return
        table = history.table().select(["prompt_key", "length"]).to_pydict()
        self.lengths = {}
        for key, n in zip(table["prompt_key"], table["length"]):
            self.add(key, n)
