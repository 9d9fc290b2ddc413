"""The main job, measured: does generation get faster as the policy learns, without changing what it learns?

    specrollout bench-rl                 # ~30 minutes on 2 cores; writes benchmarks/results/rl.json and rl.png
    specrollout bench-rl --quick         # a smoke run (writes under runs/, not benchmarks/results/)

Run 1 trains with speculative rollouts; at every step the same prompts, with the same seeds, are also generated
without speculation on the same engine and weights (which goes first alternates), so spec_s / nospec_s is measured
on identical work; and once more drafted by an oracle that knows each rollout (seeded rollouts do not depend on the
drafts, so the plain twin's tokens are the truth), under a copy of the same budget: nospec_s / oracle_s is the
limit of speculation for that step on this machine. small_batch_share is the share of the engine's step time with
at most 8 sequences running (the long tail), for the speculative call and for its plain twin.
Run 2 trains from the same seed with speculation off, for the reward curve to compare. Run 3
trains with speculation off with the next sampling seed (same prompts, data order and initial weights; other sampled
rollouts): how far two runs that differ only by chance drift apart is the noise the spec/no-spec difference is
judged against. (Sampled rollouts of runs 1 and 2 differ where rounding moves a sample across a CDF edge, README
"Lossless"; from there on the two trainings differ as runs with two seeds do.)
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, machine, versions  # noqa: E402
from rollout.config import ServiceConfig  # noqa: E402
from rollout.rl import RLConfig, RunResult, StepMetrics, plot_steps, run_grpo  # noqa: E402


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _finished_run(cfg: RLConfig) -> RunResult | None:
    """A run already made with exactly this config (its summary.json says so), read back from its metrics."""
    import pyarrow.parquet as pq

    out = Path(cfg.out_dir)
    try:
        saved = json.loads((out / "summary.json").read_text())
        rows = pq.read_table(out / "metrics.parquet").to_pylist()
    except (OSError, ValueError):
        return None
    if saved.get("config") != asdict(cfg):
        return None
    known = {f.name for f in fields(StepMetrics)}
    steps = [StepMetrics(**{k: v for k, v in r.items() if k in known}) for r in rows]
    return RunResult(cfg, steps, out, saved.get("summary", {}).get("seconds", 0.0))


def run_benchmark(cfg: RLConfig, service: ServiceConfig, reuse_baselines: bool = False) -> dict:
    """reuse_baselines: take the two runs without speculation from an earlier bench-rl with the same config (they do
    not depend on the drafter or the budget), so that a change to speculation reruns only the speculative run."""
    spec = run_grpo(replace(cfg, compare_without_speculation=True, out_dir=f"{cfg.out_dir}/spec"), service)
    service_off = replace(service, speculation=replace(service.speculation, budget="off"))
    other_seed = (cfg.sampling_seed if cfg.sampling_seed is not None else cfg.seed) + 1
    baselines = []
    for baseline in (
        replace(cfg, out_dir=f"{cfg.out_dir}/nospec"),
        replace(cfg, sampling_seed=other_seed, out_dir=f"{cfg.out_dir}/nospec_sampling_seed{other_seed}"),
    ):
        finished = _finished_run(baseline) if reuse_baselines else None
        baselines.append(finished or run_grpo(baseline, service_off))
    off, noise = baselines
    reward_off = {m.step: m.reward for m in off.steps}
    reward_noise = {m.step: m.reward for m in noise.steps}
    steps = [
        {
            "step": m.step,
            "spec_s": round(m.rollout_s, 3),
            "nospec_s": round(m.nospec_s, 3) if m.nospec_s else None,
            "oracle_s": round(m.oracle_s, 3) if m.oracle_s else None,
            "speedup": round(m.nospec_s / m.rollout_s, 3) if m.nospec_s and m.rollout_s else None,
            "oracle_speedup": round(m.nospec_s / m.oracle_s, 3) if m.nospec_s and m.oracle_s else None,
            "small_batch_share": _round(m.small_batch_share),
            "nospec_small_batch_share": _round(m.nospec_small_batch_share),
            "longest_completion": m.longest_completion,
            "median_completion": m.median_completion,
            "acceptance_length": round(m.acceptance_length, 3),
            "tokens_per_forward": round(m.tokens_per_forward, 3),
            "draft_volume": round(m.draft_volume, 3),
            "reward": m.reward,
            "reward_nospec_run": reward_off.get(m.step),
            "reward_nospec_other_sampling_seed": reward_noise.get(m.step),
            "entropy": m.entropy,
            "logp_difference": m.logp_difference,
        }
        for m in spec.steps
    ]
    speedups = [s["speedup"] for s in steps if s["speedup"]]
    oracle = [s["oracle_speedup"] for s in steps if s["oracle_speedup"]]
    tail = [s["nospec_small_batch_share"] for s in steps if s["nospec_small_batch_share"] is not None]
    last5 = _median(speedups[-5:])
    oracle5 = _median(oracle[-5:])

    def gaps(a: str, b: str) -> list[float]:
        return [abs(s[a] - s[b]) for s in steps if s[a] is not None and s[b] is not None]

    spec_vs_off = gaps("reward", "reward_nospec_run")
    seed_vs_seed = gaps("reward_nospec_run", "reward_nospec_other_sampling_seed")
    payload = {
        "steps": steps,
        "speedup_last5": last5,
        "speedup_first5": _median(speedups[:5]),
        "oracle_speedup_last5": oracle5,
        # how much of what speculation could give here it gives
        "fraction_of_oracle_last5": (
            round((last5 - 1) / (oracle5 - 1), 3) if last5 is not None and oracle5 and oracle5 > 1 else None
        ),
        "tail_fraction_last5": _median(tail[-5:]),  # of the plain twins: share of makespan at <= 8 sequences
        "reward_max_abs_difference_between_runs": round(max(spec_vs_off), 4) if spec_vs_off else None,
        "reward_mean_abs_difference_between_runs": round(statistics.mean(spec_vs_off), 4) if spec_vs_off else None,
        # the same two figures for two runs without speculation whose sampling seeds differ: run-to-run noise
        "reward_max_abs_difference_two_sampling_seeds": round(max(seed_vs_seed), 4) if seed_vs_seed else None,
        "reward_mean_abs_difference_two_sampling_seeds": (
            round(statistics.mean(seed_vs_seed), 4) if seed_vs_seed else None
        ),
        "summary_spec_run": spec.summary(),
        "summary_nospec_run": off.summary(),
        "summary_nospec_other_sampling_seed": noise.summary(),
        "setup": {
            **{k: v for k, v in vars(cfg).items()},
            "model": service.engine.model,
            "budget": service.speculation.budget,
            "drafter": service.speculation.drafter,
        },
        "machine": machine(),
        "versions": versions("trl", "ray"),
    }
    out_dir = RESULTS if cfg.out_dir.startswith("runs/bench-rl") and cfg.steps >= 16 else Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "rl.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot_steps(
        spec.steps,
        out_dir / "rl.png",
        "GRPO through specrollout: speedup and reward by step",
        rewards={
            "without speculation": [reward_off.get(m.step) for m in spec.steps],
            f"without speculation, sampling seed {other_seed}": [reward_noise.get(m.step) for m in spec.steps],
        },
    )
    print(
        f"speedup (median of last 5 steps): {payload['speedup_last5']}, oracle {payload['oracle_speedup_last5']}, "
        f"fraction of oracle {payload['fraction_of_oracle_last5']}, plain twin's time at <= 8 sequences "
        f"{payload['tail_fraction_last5']}; wrote {out_dir / 'rl.json'}"
    )
    return payload
