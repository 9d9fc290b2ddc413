"""Small prompt sets with programmatic rewards that a 135M policy can learn on a CPU.

SmolLM2-135M copies and continues lists well and is bad at arithmetic, so the tasks are list-shaped:
- copy: "Copy the following words, separated by commas: river, stone, ..." -> "river, stone, ...". The base
  policy gets there sometimes (often capitalised, or with chatter around it), so GRPO has signal from step 0; the
  trained policy answers in one sharp format, which is also what makes its rollouts easy to draft.
- count: "List the integers from a to b" (harder for the base model; used by `specrollout run --task count`).
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


WORDS = (
    "apple river stone cloud forest garden window candle mirror rocket pencil island silver thunder ocean "
    "meadow bridge castle lantern violet copper harbor planet willow falcon marble orchard canyon blossom "
    "compass glacier ember velvet saddle beacon cactus dolphin feather granite horizon jasmine kettle lemon "
    "magnet nectar pepper quartz ribbon sparrow tunnel umbrella valley walnut yellow zephyr anchor button "
    "cherry desert engine frost guitar hammer iris jungle koala ladder mango needle olive pillow quiver "
    "radish shadow tiger velcro wagon yogurt zebra"
).split()


@dataclass(frozen=True)
class CopyTask:
    prompt: str
    words: tuple[str, ...]

    @property
    def answer_text(self) -> str:
        return ", ".join(self.words)

    def reward(self, completion: str) -> float:
        """1.0 for exactly the list (lower case, ", " between words, an optional final period); else up to 0.8 for
        the words in order (longest common subsequence), less 0.2 per surplus word, per list length."""
        text = completion.strip()
        if text.rstrip(".") == self.answer_text:
            return 1.0
        got = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
        want = list(self.words)
        # Longest common subsequence of the words, O(len(got) * len(want)) on short lists.
        prev = [0] * (len(want) + 1)
        for g in got:
            cur = [0]
            for j, w in enumerate(want):
                cur.append(prev[j] + 1 if g == w else max(prev[j + 1], cur[j]))
            prev = cur
        surplus = max(0, len(got) - len(want))
        return max(0.0, (0.8 * prev[-1] - 0.2 * surplus) / len(want))


def copy_tasks(n: int, seed: int = 0) -> list[CopyTask]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = tuple(rng.sample(WORDS, rng.randint(3, 6)))
        out.append(CopyTask(f"Copy the following words, separated by commas: {', '.join(words)}", words))
    return out


TASKS = {"copy": copy_tasks, "count": lambda n, seed=0: list_tasks(n, seed)}


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
