"""Makespan of a GRPO-shaped batch under each draft budget, side by side on one machine.

    specrollout run --save-policy --out runs/main            # the main job, keeping its trained policy (~12 minutes)
    python benchmarks/service.py --policy runs/main/policy   # headline (trained policy) + proxy (~40 minutes)
    python benchmarks/service.py --policy runs/main/policy --skip-proxy   # the headline only (~12 minutes)
    python benchmarks/service.py                             # the proxy only; the recorded headline stays
    python benchmarks/service.py --device cuda               # on a GPU: results/service_cuda.json, CPU figures stay
    python benchmarks/service.py --quick --out /tmp/s.json   # a reduced run that only proves the wiring

Workload: 32 prompts x 8 samples, 64 sequences decoded together (the rest queue), sampled at T=1.0. Two policies:
- the headline (top-level keys; `--policy DIR`, saved by `specrollout run --save-policy`): the main job's trained
  policy on prompts of the task it was trained on (the long-tail task by default: per block of four prompts, two
  short copies, a medium count and a long count), up to the task's completion limit. A few long rollouts set the
  makespan, as in reasoning RL;
- the proxy (under `proxy`): the base SmolLM2 with its logits divided by 0.6, which is exactly sampling the base
  model at T=0.6, on counting prompts whose answers run to the 256-token limit and beyond. Needs no training.
Every mode first sees the same previous round of the same prompts (the drafter's history, as an RL run would have
from the step before), then generates the timed round with the same seeds. The modes share one loaded model and
run one after another, twice (--passes), interleaved; each mode's makespan is its fastest run among those whose
rollouts equal plain decoding's (all of them, almost always: see measure()).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_run_options, check_run_options, machine, versions, write  # noqa: E402
from drafters.base import make_drafter  # noqa: E402
from rollout.budget import parse_budget  # noqa: E402
from rollout.checkpoint import resolve_model  # noqa: E402
from rollout.config import EngineConfig  # noqa: E402
from rollout.cost_model import CostModel  # noqa: E402
from rollout.engine.cost_probe import cost_model_file, measure_cost_model  # noqa: E402
from rollout.engine.engine import Engine  # noqa: E402
from rollout.engine.model import TargetModel  # noqa: E402
from rollout.sampling import SamplingParams  # noqa: E402
from rollout.tasks import TASKS, chat_prompt_ids, list_tasks  # noqa: E402

PROMPTS, SAMPLES, MAX_TOKENS, SLOTS = 32, 8, 256, 64
QUICK = dict(prompts=4, samples=4, max_tokens=32)  # --quick: proves the wiring, figures too noisy to quote
SHARPEN = 0.6  # the proxy policy samples the base model at this temperature
MODES = ("auto", "fixed:2", "fixed:4", "fixed:8", "off")


def json_key(mode: str) -> str:
    """A budget mode's key in the JSON: fixed:4 -> fixed4."""
    return mode.replace(":", "")


@dataclass
class Workload:
    """One GRPO-shaped batch on a loaded model, with the previous round every mode's drafter starts from."""

    model: TargetModel
    config: EngineConfig
    cost: CostModel
    batch: list[list[int]]  # prompt ids, each prompt `samples` times
    groups: list[str]
    temperature: float
    max_tokens: int
    previous: list = field(default_factory=list)  # the previous round's rollouts (RolloutResult)

    def params(self, round_: int) -> list[SamplingParams]:
        return [
            SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens, seed=1000 * round_ + i)
            for i in range(len(self.batch))
        ]

    def run(self, mode: str) -> tuple[float, list, dict]:
        """(seconds, results, figures) of the timed round under a budget mode."""
        engine = Engine(self.model, self.config, make_drafter("suffix"), parse_budget(mode, cost=self.cost), 16)
        engine.resume_after(self.previous)
        t0 = time.perf_counter()
        results = engine.generate(self.batch, self.params(1), self.groups)
        seconds = time.perf_counter() - t0
        tokens = sum(len(r.token_ids) for r in results)
        forwards = sum(r.spec.target_forwards for r in results)
        return (
            seconds,
            results,
            {
                "tokens": tokens,
                "engine_steps": engine.total_forwards,
                "tokens_per_sequence_forward": round(tokens / forwards, 3),
                "drafted": sum(r.spec.drafted for r in results),
                "accepted": sum(r.spec.accepted for r in results),
            },
        )


def prepare(
    folder: Path, prompt_texts: list[str], temperature: float, device: str, samples: int, max_tokens: int
) -> Workload:
    """Load the model, probe its cost model (cached) and generate the previous round by plain decoding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = EngineConfig(max_num_seqs=SLOTS, max_model_len=512, device=device)
    model = TargetModel.from_folder(folder, max_model_len=config.max_model_len, device=device)
    cost = measure_cost_model(model, SLOTS, cost_model_file(folder, config))
    prompts = [chat_prompt_ids(tokenizer, text) for text in prompt_texts]
    batch = [p for p in prompts for _ in range(samples)]
    groups = [f"p{i // samples}" for i in range(len(batch))]
    workload = Workload(model, config, cost, batch, groups, temperature, max_tokens)
    # The previous RL step: one round of plain decoding whose rollouts every mode's drafter starts from.
    t0 = time.perf_counter()
    workload.previous = Engine(model, config).generate(batch, workload.params(0), groups)
    print(
        f"previous round: {sum(len(r.token_ids) for r in workload.previous)} tokens in {time.perf_counter() - t0:.0f}s"
    )
    return workload


def measure(
    folder: Path,
    prompt_texts: list[str],
    temperature: float,
    passes: int = 2,
    device: str = "cpu",
    samples: int = SAMPLES,
    max_tokens: int = MAX_TOKENS,
) -> dict:
    """Every mode's makespan on one workload: {makespan_s, speedup_auto_vs_off, fastest_mode, runs, detail}."""
    workload = prepare(folder, prompt_texts, temperature, device, samples, max_tokens)

    def run(mode: str) -> tuple[float, list[list[int]], dict]:
        seconds, results, info = workload.run(mode)
        return seconds, [list(r.token_ids) for r in results], info

    # Each mode runs `passes` times, interleaved. A run's rollouts can differ from plain decoding's where a uniform
    # falls within rounding of a CDF boundary (README, "Lossless"); on a workload whose makespan is one long tail,
    # one such rollout moves the makespan by seconds, so a mode's makespan is its fastest run among those whose
    # rollouts equal the plain run's, and runs that differ are recorded, not compared.
    timed: dict[str, list[tuple[float, list[list[int]], dict]]] = {m: [] for m in MODES}
    for _ in range(passes):
        for mode in MODES:
            seconds, outputs, info = run(mode)
            print(f"{mode:>8}: {seconds:6.1f}s  {info}")
            timed[mode].append((seconds, outputs, info))
    reference = timed["off"][0][1]
    makespan, detail, runs = {}, {}, {}
    for mode, entries in timed.items():
        differing = [sum(a != b for a, b in zip(outputs, reference)) for _, outputs, _ in entries]
        runs[json_key(mode)] = [
            {"seconds": round(s, 2), "differing_rollouts": n} for (s, _, _), n in zip(entries, differing)
        ]
        same = [i for i, n in enumerate(differing) if n == 0] or list(range(len(entries)))
        best = min(same, key=lambda i: entries[i][0])
        makespan[mode] = entries[best][0]
        detail[json_key(mode)] = {**entries[best][2], "differing_rollouts": differing[best]}
    speedup = makespan["off"] / makespan["auto"]
    print(f"speedup auto vs off: {speedup:.2f}x")
    return {
        "makespan_s": {json_key(m): round(s, 2) for m, s in makespan.items()},
        "speedup_auto_vs_off": round(speedup, 3),
        "fastest_mode": json_key(min(makespan, key=makespan.get)),
        "passes": passes,
        "runs": runs,
        "detail": detail,
    }


def trained_workload(policy: Path, prompts: int) -> tuple[list[str], dict]:
    """The trained policy's task prompts and completion limit, from the run's summary.json next to the policy."""
    summary = policy.parent / "summary.json"
    if not summary.exists():  # without it the task, and so the prompts, would be a guess
        raise SystemExit(f"no {summary}: --policy takes the folder `specrollout run --save-policy` writes")
    run = json.loads(summary.read_text())["config"]
    task, seed = run.get("task", "copy"), int(run.get("seed", 0))
    if task not in TASKS:
        raise SystemExit(f"{summary} names task {task!r}; known tasks: {', '.join(TASKS)}")
    texts = [t.prompt for t in TASKS[task](prompts, seed=seed)]
    max_tokens = int(run.get("max_completion_length") or MAX_TOKENS)
    workload = {"task": task, "seed": seed, "training_prompts": run.get("distinct_prompts"), "max_tokens": max_tokens}
    return texts, {**workload, "run": run}


HEADLINE_KEYS = ("makespan_s", "speedup_auto_vs_off", "fastest_mode", "passes", "runs", "detail", "workload")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser, "service")
    parser.add_argument("--policy", type=Path, help="the headline: a policy saved by `specrollout run --save-policy`")
    parser.add_argument("--skip-proxy", action="store_true", help="only the headline (with --policy)")
    parser.add_argument("--passes", type=int, default=2, help="timed runs of each mode, interleaved (default 2)")
    args = parser.parse_args(argv)
    check_run_options(parser, args, "service")
    if args.skip_proxy and args.policy is None:
        parser.error("--skip-proxy needs --policy")
    if args.passes < 1:
        parser.error(f"--passes must be at least 1, got {args.passes}")
    size = QUICK if args.quick else dict(prompts=PROMPTS, samples=SAMPLES, max_tokens=MAX_TOKENS)
    options = dict(passes=args.passes, device=str(args.device), samples=size["samples"])
    trained = None
    if args.policy is not None:  # checked before the proxy's half hour, not after it
        try:
            folder = resolve_model(str(args.policy))
        except (FileNotFoundError, ValueError) as exc:
            parser.error(f"--policy: {exc}")
        trained = (folder, *trained_workload(Path(folder), size["prompts"]))
    recorded = json.loads(args.out.read_text()) if args.out.exists() else {}
    # A run without --policy keeps the recorded headline; one without the proxy keeps the recorded proxy.
    payload = {k: recorded[k] for k in (*HEADLINE_KEYS, "proxy") if k in recorded}
    if trained is not None:
        folder, texts, workload = trained
        max_tokens = size["max_tokens"] if args.quick else workload["max_tokens"]
        payload.update(measure(folder, texts, 1.0, max_tokens=max_tokens, **options))
        payload["workload"] = {**workload, "temperature": 1.0, **size, "max_tokens": max_tokens, "slots": SLOTS}
    if not args.skip_proxy:
        texts = [t.prompt for t in list_tasks(size["prompts"], seed=7)]
        proxy = measure(resolve_model(args.model, log=print), texts, SHARPEN, max_tokens=size["max_tokens"], **options)
        proxy["workload"] = {
            "policy": f"base SmolLM2 sampled at T={SHARPEN} (= logits / {SHARPEN} at T=1.0), a stand-in for a "
            "sharpened policy",
            "task": "count (list_tasks, seed 7)",
            **size,
            "slots": SLOTS,
        }
        payload["proxy"] = proxy
    payload["setup"] = {"drafter": "suffix", "history": "one previous round of the same prompts", "modes": MODES}
    payload["machine"], payload["versions"] = machine(str(args.device)), versions()
    write("service", payload, args.out)


if __name__ == "__main__":
    main()
