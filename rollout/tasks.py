"""Small prompt sets with programmatic rewards that a 135M policy can learn on a CPU.

SmolLM2-135M copies and continues lists well and is bad at arithmetic, so the tasks are list-shaped: count from a
to b. A rollout is scored by how much of the expected list it gets right, in order, with nothing else around it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: tuple[int, ...]

    def reward(self, completion: str) -> float:
        """1.0 for exactly the answer as a comma-separated list; partial credit for a correct prefix."""
        text = completion.strip().rstrip(".")
        if not re.fullmatch(r"-?\d+(\s*,\s*-?\d+)*", text):
            return 0.0
        got = [int(x) for x in text.split(",")]
        if got == list(self.answer):
            return 1.0
        prefix = 0
        for a, b in zip(got, self.answer):
            if a != b:
                break
            prefix += 1
        return 0.5 * prefix / len(self.answer)


def count_task(start: int, length: int) -> Task:
    end = start + length - 1
    return Task(
        prompt=f"List the integers from {start} to {end}, separated by commas. Reply with the list only.",
        answer=tuple(range(start, end + 1)),
    )


def list_tasks(n: int, seed: int = 0) -> list[Task]:
    rng = random.Random(seed)
    return [count_task(rng.randint(1, 60), rng.randint(5, 12)) for _ in range(n)]


def chat_prompt_ids(tokenizer, content: str) -> list[int]:
    """Token ids of a one-turn chat prompt, ready for the assistant's reply.

    (transformers 5 returns a BatchEncoding from apply_chat_template, 4.x a plain list.)
    """
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
