"""A measured cost profile: the embedded engine's step cost on this machine (`cpu`, or a GPU with DEVICE=cuda in
examples/gpu_check.sh), measured once per machine, model, device and slot count, and cached.

The forward is the engine's own start-up probe (the grid `auto` plans with: equal chains at a 128-token context on
an idle machine). Real steps differ from it: contexts grow, drafts are trees of unequal lengths, each accepted token
is one more row drawn and committed on the host. So the profile prices a step as

    seconds = scale x grid(tokens', B) + per context token beyond 128 + per drafted sequence of a ragged forward
              + per step + per sequence + per accepted draft token

(tokens': the tokens plus the rows padded to the longest draft at the probe's padded price, as `auto` prices them)

with the context term measured directly (`context_slope`: the same forwards timed at two contexts; fitted, it
came out 0 on this machine, where the calibration's contexts stay near the probe's and the batch drains as they
grow, while a long-context step pays ~3 us per context token) and the other five coefficients fitted (least
squares, none negative) to the steps of calibration runs of the engine itself: a counting task's prompts (a seed of
their own, not a benchmark's) at T=0.6 with the suffix drafter, decoded plainly and under fixed:4, fixed:8 and auto,
the drafter's and budget's own time taken out (the simulator times that part as it runs).

A shared machine's speed drifts (on this one, up to 2x within an hour), and a profile holds for the speed it was
calibrated at. `speed_index` times a few fixed forwards in seconds; taken before and after the calibration, it is
kept in the profile (`speed_index_s`). Taken again next to a run, the ratio can scale the profile to the machine's
speed then (`Profile.scaled`). It times forwards of its own, never the run it stands beside. On this machine it
helped in one run and hurt in the others (benchmarks/README.md, 2026-12-07/08): the index moves by more, or other
than, the runs it stands beside. benchmarks/simulate.py reports it beside the calibrated figure.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np

from rollout.config import EngineConfig
from rollout.step_cost import PROBE_CONTEXT, GridForward, Profile, padded_rows, ragged_sequences

CALIBRATION_PROMPTS = 8  # x 8 samples, all in flight together: the batch drains from 64 to 1
CALIBRATION_SEED = 101  # the prompts' seed (list_tasks): the benchmarks use others
CALIBRATION_TOKENS = 192
CALIBRATION_BUDGETS = ("off", "fixed:4", "fixed:8", "auto")
FEATURES = ("scale", "per_context_token_s", "per_ragged_seq_s", "per_step_s", "per_seq_s", "per_accepted_s")
SPEED_SHAPES = [(1, 1), (4, 4), (16, 1)]  # (B, k): a tail step, a drafted step, a fuller batch
SPEED_CONTEXT = 32  # short: the index is taken often, and its cache is prefilled each time
SLOPE_SHAPES = [(64, 1), (16, 1)]  # (B, k): plain decoding steps, where attention's share of the forward is largest
SLOPE_CONTEXT = 384  # beside PROBE_CONTEXT: about where rollouts of a few hundred tokens end


def measure_engine_profile(config: EngineConfig | None = None, log: Callable[[str], None] = print) -> Profile:
    """This machine's profile for `config`'s model on its device (cached beside the engine's cost model)."""
    from rollout.checkpoint import resolve_model
    from rollout.engine.cost_probe import cost_model_file, measure_cost_model
    from rollout.engine.model import TargetModel

    config = config or EngineConfig(max_num_seqs=64, max_model_len=512)
    folder = resolve_model(config.model, log=log)
    path = cost_model_file(folder, config)
    # The probe's batches depend on the slots; "context": the context term measured, padded rows priced (older
    # profiles fitted the one and did not price the other).
    path = path.with_name(f"{path.stem}-profile-context-{config.max_num_seqs}.json")
    if path.exists():
        return Profile.from_dict(json.loads(path.read_text()), str(path))
    model = TargetModel.from_folder(
        folder, config.max_model_len, config.dtype, config.device, tune=config.tune_matmul, matmul=config.matmul
    )
    grid = measure_cost_model(model, config.max_num_seqs, cost_model_file(folder, config), log=log)
    log(f"measuring this machine's cost profile on {config.device} for the simulator (once; cached)")
    before = speed_index(model)
    per_context = context_slope(model)
    steps, seconds = _calibration_steps(model, folder, config, grid)
    speed = (before + speed_index(model)) / 2
    x, y = np.asarray(steps), np.asarray(seconds)
    column = FEATURES.index("per_context_token_s")
    fitted = nonnegative_fit(np.delete(x, column, axis=1), y - per_context * x[:, column])
    coef = dict(zip([f for f in FEATURES if f != "per_context_token_s"], fitted), per_context_token_s=per_context)
    forward = GridForward(grid, coef["scale"], coef["per_context_token_s"], coef["per_ragged_seq_s"])
    device = config.device.split(":")[0]
    meta = {
        "device": describe_device(config.device),
        "model": config.model,
        "engine": "specrollout embedded",
        "calibration": {"steps": len(seconds), "budgets": list(CALIBRATION_BUDGETS), "seed": CALIBRATION_SEED},
        "per_context_token_s": f"measured: {SLOPE_SHAPES} at contexts {PROBE_CONTEXT} and {SLOPE_CONTEXT}",
        "speed_index_s": speed,
    }
    per_us = [1e6 * coef[k] for k in ("per_seq_s", "per_step_s", "per_accepted_s")]
    profile = Profile(device, forward, *per_us, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=1))
    return profile


def speed_index(model, rounds: int = 7) -> float:
    """Seconds of one forward at each of SPEED_SHAPES, summed: the machine's speed now, for this model. The median
    of `rounds`, not the fastest: the runs it stands beside pay the machine's load as well as its clock."""
    import statistics

    from rollout.engine.cost_probe import time_forwards

    # The first round is dropped: a model's first forwards of a shape run slow.
    times = time_forwards(model, SPEED_SHAPES, SPEED_CONTEXT, rounds + 1, pick=lambda t: statistics.median(t[1:]))
    return sum(times.values())


def context_slope(model, rounds: int = 5) -> float:
    """Seconds per context token attended beyond the probe's: SLOPE_SHAPES timed at PROBE_CONTEXT and at
    SLOPE_CONTEXT, or the longest the model holds (0 where that is not longer), the fastest of `rounds` each; the
    difference per extra context token, least squares through 0 over the shapes, not below 0."""
    from rollout.engine.cost_probe import time_forwards

    longer = min(SLOPE_CONTEXT, model.max_model_len - 2)  # room for the cache and the new token
    if longer <= PROBE_CONTEXT:
        return 0.0
    short, long_ = (time_forwards(model, SLOPE_SHAPES, c, rounds) for c in (PROBE_CONTEXT, longer))
    extra = np.array([b * (longer - PROBE_CONTEXT) for b, _ in SLOPE_SHAPES], dtype=np.float64)  # [S]
    delta = np.array([long_[s] - short[s] for s in SLOPE_SHAPES])  # [S] seconds
    return max(float(extra @ delta / (extra @ extra)), 0.0)


def describe_device(device: str) -> str:
    import torch

    from rollout.engine.hardware import describe

    return ", ".join(f"{k}={v}" for k, v in sorted(describe(torch.device(device)).items()))


def nonnegative_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares y ~ x [N, F] with no coefficient below 0: a negative one is dropped (set to 0) and the rest
    refitted, until none is."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        fit, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (fit >= 0).all():
            coef[active] = fit
            break
        active.pop(int(np.argmin(fit)))
    return coef


def _calibration_steps(model, folder, config: EngineConfig, grid) -> tuple[list[list[float]], list[float]]:
    """Per real step: its features (FEATURES' order, summed over its forwards) and its seconds less the drafter's
    and the budget's."""
    from transformers import AutoTokenizer

    from drafters.base import make_drafter
    from rollout.budget import parse_budget
    from rollout.engine.engine import Engine
    from rollout.sampling import SamplingParams
    from rollout.tasks import chat_prompt_ids, list_tasks

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [chat_prompt_ids(tokenizer, t.prompt) for t in list_tasks(CALIBRATION_PROMPTS, seed=CALIBRATION_SEED)]
    batch = [p for p in prompts for _ in range(8)]
    groups = [f"p{i // 8}" for i in range(len(batch))]

    def params(round_: int) -> list[SamplingParams]:
        return [SamplingParams(0.6, max_tokens=CALIBRATION_TOKENS, seed=1000 * round_ + i) for i in range(len(batch))]

    previous = Engine(model, config).generate(batch, params(0), groups)  # the drafter's history: an earlier round
    steps, seconds = [], []
    unscaled = GridForward(grid)  # the grid alone: where a step's tokens and padded rows read it
    for budget in CALIBRATION_BUDGETS:
        engine = Engine(model, config, make_drafter("suffix"), parse_budget(budget, cost=grid), 16)
        engine.resume_after(previous)
        forwards: list[list[float]] = []
        aside = [0.0]  # the drafter's and budget's seconds in this step

        def run(seqs, slot_lo, drafts, keep_top, _run=engine.runner.run):
            fed = sum(len(s.tokens) - s.cache_len + len(d) for s, d in zip(seqs, drafts))
            context = sum(s.cache_len for s in seqs)
            outcome = _run(seqs, slot_lo, drafts, keep_top)
            accepted = sum(len(p) for p in outcome.paths)
            extra = context - PROBE_CONTEXT * len(seqs)
            lengths = [len(d) for d in drafts]
            priced = unscaled.priced_tokens(fed, len(seqs), padded_rows(lengths))
            forwards.append([grid(priced, len(seqs)), extra, ragged_sequences(lengths), 1.0, len(seqs), accepted])
            return outcome

        def timed(method):
            def call(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    aside[0] += time.perf_counter() - t0

            return call

        engine.runner.run = run
        engine.speculator.plan = timed(engine.speculator.plan)
        engine.speculator.learn = timed(engine.speculator.learn)
        for i, (prompt, p, g) in enumerate(zip(batch, params(1), groups)):
            engine.add_request(prompt, p, group=g, request_id=f"c{i}")
        while engine.has_unfinished():
            forwards.clear()
            aside[0] = 0.0
            t0 = time.perf_counter()
            engine.step()
            if forwards:
                steps.append(np.sum(forwards, axis=0).tolist())
                seconds.append(time.perf_counter() - t0 - aside[0])
    return steps, seconds


def main(argv: list[str] | None = None) -> None:
    """python -m rollout.engine_profile --device cuda --out FILE: measure this device's profile (gpu_check.sh)."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True, help="JSON file the simulator reads as a profile")
    args = parser.parse_args(argv)
    config = EngineConfig(model=args.model, max_num_seqs=args.slots, max_model_len=512, device=args.device)
    profile = measure_engine_profile(config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(profile.to_dict(), indent=1))
    print(f"wrote {args.out}: {profile.name} profile of {args.model}")


if __name__ == "__main__":
    main()
