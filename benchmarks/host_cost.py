"""The engine's own work per sequence per step: everything a step does outside the model forward.

    python benchmarks/host_cost.py   # about a minute -> results/host_cost.json (benchmarks/engine.py records them too)

Beside a GPU a decode step of a whole batch takes 10-30 ms, so what the engine does on the host around the forward
(admission, drafting, building the batch, sampling bookkeeping, verification, committing tokens, telling the
drafter) must stay a small fraction of it. To see that cost and nothing else, the target is a tiny random Llama
(vocab 384, 2 layers, hidden 64, as the tests build): its forward costs almost nothing, and the time inside it is
subtracted anyway.

Figure: (step wall time - time inside the model forward) / running sequences, median over full-batch decode steps
(every slot running, none prefilling), per mode and batch size:
- "plain": no drafter, budget off.
- "suffix_fixed4": the suffix drafter with budget fixed:4, its history filled by an earlier round of the same
  prompts (greedy, so the second round's drafts come true and each step commits five tokens per sequence).
- "suffix_auto": the same with budget auto (its step-cost curve probed on the tiny model): beside suffix_fixed4,
  what the budget's own selection and learning add per sequence-step.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, versions, write  # noqa: E402
from drafters.base import make_drafter  # noqa: E402
from rollout.budget import parse_budget  # noqa: E402
from rollout.config import EngineConfig  # noqa: E402
from rollout.engine.cost_probe import measure_cost_model  # noqa: E402
from rollout.engine.engine import Engine  # noqa: E402
from rollout.engine.model import TargetModel  # noqa: E402
from rollout.sampling import SamplingParams  # noqa: E402

BATCHES = (1, 16, 64)
MODES = {"plain": ("none", "off"), "suffix_fixed4": ("suffix", "fixed:4"), "suffix_auto": ("suffix", "auto")}
NEW_TOKENS = 96
PROMPT_LEN = 16


def tiny_llama(folder: Path) -> Path:
    """A random 2-layer Llama saved to `folder` (the shape tests/conftest.py builds)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


class ForwardClock:
    """Wraps a model's forward and adds up the seconds spent inside it."""

    def __init__(self, model: TargetModel):
        self.seconds = 0.0
        self._forward = model.forward
        model.forward = self  # type: ignore[method-assign]

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self._forward(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def per_seq_step_us(model: TargetModel, clock: ForwardClock, mode: str, batch: int) -> float:
    drafter, budget = MODES[mode]
    config = EngineConfig(max_num_seqs=batch, max_model_len=model.max_model_len)
    cost = partial(measure_cost_model, model, batch, log=lambda _: None)  # measured only for `auto`
    engine = Engine(model, config, make_drafter(drafter), parse_budget(budget, cost=cost))
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, 384, (PROMPT_LEN,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    engine.generate(prompts, params)  # the earlier round: the history the drafter refreshes from
    engine.refresh_drafter()
    for p in prompts:
        engine.add_request(p, params)
    samples = []
    while engine.has_unfinished():
        full = len(engine.running) == batch and all(s.cache_len > 0 for s in engine.running)
        before, started = clock.seconds, time.perf_counter()
        engine.step()
        wall = time.perf_counter() - started
        if full:
            samples.append((wall - (clock.seconds - before)) / batch)
    return statistics.median(samples) * 1e6


def measure(batches=BATCHES, modes=tuple(MODES)) -> dict[str, dict[str, float]]:
    # One thread: the tiny forward has nothing to share out, and the figure is about the host's Python anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = TargetModel.from_folder(tiny_llama(Path(tmp)), max_model_len=512, tune=False)
        clock = ForwardClock(model)
        per_seq_step_us(model, clock, "plain", 4)  # warm-up: first calls pay for lazy initialisation
        return {m: {str(b): round(per_seq_step_us(model, clock, m, b), 1) for b in batches} for m in modes}
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    write("host_cost", {"host_us_per_seq_step": measure(), "machine": machine(), "versions": versions()})
