"""Makespan of a GRPO-shaped batch under each draft budget, side by side on one machine.

    python benchmarks/service.py     # writes benchmarks/results/service.json (15-30 minutes on 2 cores)

Workload: 32 prompts x 8 samples, up to 256 tokens, 64 sequences decoded together (the rest queue), sampled at
T=1.0 from a *sharpened* policy. Until the main job's trained policy exists, the proxy for sharpening is the base
SmolLM2 with its logits divided by 0.6, which is exactly sampling the base model at T=0.6 (stated in the JSON).
Every mode first sees the same previous round of the same prompts (the drafter's history, as an RL run would have
from the step before), then generates the timed round with the same seeds. The modes share one loaded model and
run one after another, twice, interleaved; each mode's makespan is the faster of its two runs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, versions, write  # noqa: E402
from drafters.base import make_drafter  # noqa: E402
from rollout.budget import parse_budget  # noqa: E402
from rollout.config import EngineConfig  # noqa: E402
from rollout.cost_model import measure_cost_model  # noqa: E402
from rollout.engine.checkpoint import resolve_model  # noqa: E402
from rollout.engine.engine import Engine, cost_model_file  # noqa: E402
from rollout.engine.model import TargetModel  # noqa: E402
from rollout.sampling import SamplingParams  # noqa: E402
from rollout.tasks import chat_prompt_ids, list_tasks  # noqa: E402

PROMPTS, SAMPLES, MAX_TOKENS, SLOTS = 32, 8, 256, 64
SHARPEN = 0.6  # the proxy policy samples the base model at this temperature
MODES = ("auto", "fixed:4", "fixed:8", "off")


def main() -> None:
    from transformers import AutoTokenizer

    folder = resolve_model("smollm2-135m", log=print)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = EngineConfig(max_num_seqs=SLOTS, max_model_len=512)
    model = TargetModel.from_folder(folder, max_model_len=config.max_model_len)
    cost = measure_cost_model(model, SLOTS, cost_model_file(folder, config))
    prompts = [chat_prompt_ids(tokenizer, t.prompt) for t in list_tasks(PROMPTS, seed=7)]
    batch = [p for p in prompts for _ in range(SAMPLES)]
    groups = [f"p{i // SAMPLES}" for i in range(len(batch))]

    def params(round_: int):
        return [
            SamplingParams(temperature=SHARPEN, max_tokens=MAX_TOKENS, seed=1000 * round_ + i)
            for i in range(len(batch))
        ]

    # The previous RL step: one round of plain decoding whose rollouts every mode's drafter starts from.
    warm = Engine(model, config)
    t0 = time.perf_counter()
    previous = warm.generate(batch, params(0), groups)
    print(f"previous round: {sum(len(r.token_ids) for r in previous)} tokens in {time.perf_counter() - t0:.0f}s")

    def run(mode: str) -> tuple[float, dict]:
        engine = Engine(model, config, make_drafter("suffix"), parse_budget(mode, cost=cost), max_draft_tokens=16)
        engine.history.append_results(previous)
        engine.policy_version = 1
        engine.refresh_drafter()
        t0 = time.perf_counter()
        results = engine.generate(batch, params(1), groups)
        seconds = time.perf_counter() - t0
        tokens = sum(len(r.token_ids) for r in results)
        forwards = sum(r.spec.target_forwards for r in results)
        return seconds, {
            "tokens": tokens,
            "engine_steps": engine.total_forwards,
            "tokens_per_sequence_forward": round(tokens / forwards, 3),
            "drafted": sum(r.spec.drafted for r in results),
            "accepted": sum(r.spec.accepted for r in results),
            **({"gate": engine.budget.gate.summary()} if hasattr(engine.budget, "gate") else {}),
        }

    makespan = {m: float("inf") for m in MODES}
    detail: dict[str, dict] = {}
    for _ in range(2):
        for mode in MODES:
            seconds, info = run(mode)
            print(f"{mode:>8}: {seconds:6.1f}s  {info}")
            if seconds < makespan[mode]:
                makespan[mode], detail[mode] = seconds, info
    key = {"auto": "auto", "fixed:4": "fixed4", "fixed:8": "fixed8", "off": "off"}
    speedup = makespan["off"] / makespan["auto"]
    print(f"speedup auto vs off: {speedup:.2f}x")
    write(
        "service",
        {
            "makespan_s": {key[m]: round(s, 2) for m, s in makespan.items()},
            "speedup_auto_vs_off": round(speedup, 3),
            "fastest_mode": key[min(makespan, key=makespan.get)],
            "detail": {key[m]: d for m, d in detail.items()},
            "policy": f"proxy for a sharpened policy: base SmolLM2 sampled at T={SHARPEN} (= logits / {SHARPEN} at "
            "T=1.0); the main job's trained policy replaces it once it exists",
            "setup": {
                "prompts": PROMPTS,
                "samples": SAMPLES,
                "max_tokens": MAX_TOKENS,
                "slots": SLOTS,
                "drafter": "suffix",
                "history": "one previous round of the same prompts",
            },
            "machine": machine(),
            "versions": versions(),
        },
    )


if __name__ == "__main__":
    main()
