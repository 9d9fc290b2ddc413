"""Small prompt sets with programmatic rewards that a 135M policy can learn on a CPU.

SmolLM2-135M copies and continues lists well and is bad at arithmetic, so the tasks are list-shaped:
- copy: "Copy the following words, separated by commas: river, stone, ..." -> "river, stone, ...". The base
  policy gets there sometimes (often capitalised, or with chatter around it), so GRPO has signal from step 0; the
  trained policy answers in one sharp format, which is also what makes its rollouts easy to draft.
- count: "List the integers from a to b" (harder for the base model; used by `specrollout run --task count`).
- tail (the default of `specrollout run`): a mix of both whose completion lengths are heavy-tailed, as reasoning
  rollouts are; see `tail_tasks`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable


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


def count_task(start: int, length: int) -> Task:
    end = start + length - 1
    return Task(
        prompt=f"List the integers from {start} to {end}, separated by commas. Reply with the list only.",
        answer=tuple(range(start, end + 1)),
    )


def list_tasks(n: int, seed: int = 0) -> list[Task]:
    rng = random.Random(seed)
    return [count_task(rng.randint(1, 60), rng.randint(5, 12)) for _ in range(n)]


# Prompts of one training step of the tail task: (kind, how many). Kinds and their answers' lengths in SmolLM2
# tokens (digits are one token each, ", " two): a copy of 3-6 words 6-14; a count from 1 to 10-20, 28-68; a count
# from 1 to 52-72, 199-279.
TAIL_STEP = (("copy", 2), ("medium", 1), ("long", 1))


def tail_tasks(n: int, seed: int = 0) -> list:
    """The long-tail task: `n` prompts in blocks of four, one block per training step, each block two copy prompts,
    one medium count and one long count ("List the integers from 1 to 64, ...").

    Why it stands for RL rollouts: in a GRPO step of a reasoning task most completions end early and a few run many
    times longer (DAS, Seer), so the step's makespan is set by a handful of long sequences decoding at tiny batch.
    Here every step has the same shape: with 8 samples per prompt, 16 completions of 6-14 tokens, 8 of 28-68 and 8 of
    199-279 once learned (the base policy's chatter runs to the length limit, which is a long tail too), so the
    longest completion is 4x the median or more and the last 8 sequences decode alone for most of the step. The
    long answers are structured (a list the policy learns to write exactly, one shared with every other count
    prompt), so the policy's own earlier rollouts predict them, as a reasoning policy's earlier rollouts predict its
    recurring derivations. The training loop keeps the blocks in order (`ordered` in TASK_FAMILIES)."""
    rng = random.Random(seed)
    copies = iter(copy_tasks(n, seed))
    out: list = []
    while len(out) < n:
        for kind, k in TAIL_STEP:
            for _ in range(k):
                if kind == "copy":
                    out.append(next(copies))
                else:
                    length = rng.randint(10, 20) if kind == "medium" else rng.randint(52, 72)
                    out.append(count_task(1, length))
    return out[:n]


@dataclass(frozen=True)
class TaskFamily:
    build: Callable[..., list]  # (n, seed) -> prompts with .prompt and .reward(completion)
    max_completion_length: int  # room for the longest answer, and for a base policy's chatter beyond it
    ordered: bool = False  # the prompts come in per-step blocks: the trainer must not shuffle them


TASK_FAMILIES = {
    "tail": TaskFamily(tail_tasks, max_completion_length=288, ordered=True),
    "copy": TaskFamily(copy_tasks, max_completion_length=48),
    "count": TaskFamily(lambda n, seed=0: list_tasks(n, seed), max_completion_length=48),
}
TASKS = {name: family.build for name, family in TASK_FAMILIES.items()}


def chat_ids(tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template (add_generation_prompt and the
    like in template_kwargs).

    (transformers 5 returns a BatchEncoding from apply_chat_template, 4.x a plain list.)
    """
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **template_kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def chat_prompt_ids(tokenizer, content: str) -> list[int]:
    """Token ids of a one-turn chat prompt, ready for the assistant's reply."""
    return chat_ids(tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True)
