"""The makespan simulator (rollout/simulator.py) and its cost profiles (rollout/step_cost.py).

The simulator must take the real engine's steps: for a fixed budget, which does not depend on timing, a trace
recorded by the real engine replays to the same forwards, drafted and accepted nodes, exactly (tiny model here,
SmolLM2 in the slow test). Step counts and prices are checked against hand-computed values; the published GPU
profile against the published figures it cites.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from conftest import SMOL_MAX_LEN, make_engine
from helpers import cost_from_function

from drafters.base import make_drafter
from drafters.reference import ReferenceDrafter
from rollout.budget import FixedBudget, parse_budget
from rollout.cli import main
from rollout.history import RolloutHistory
from rollout.sampling import SamplingParams
from rollout.simulator import compare, simulate
from rollout.step_cost import LinearForward, Profile, load_profile

TRACE = "benchmarks/traces/smollm2_t0.6.parquet"
FLAT = Profile("flat", LinearForward(base_s=0.01, per_token_s=0.001, per_sequence_s=0.0001, per_context_token_s=1e-6))


def trace_of(rows: list[tuple[list[int], list[int], str]], version: int = 0) -> pa.Table:
    """A trace from (prompt, completion, group) rows."""
    history = RolloutHistory()
    history.append(
        pa.Table.from_pylist(
            [
                {
                    "request_id": f"r{i}",
                    "group": g,
                    "policy_version": version,
                    "prompt_ids": p,
                    "token_ids": t,
                    "logprobs": [0.0] * len(t),
                    "length": len(t),
                }
                for i, (p, t, g) in enumerate(rows)
            ],
            schema=history.table().schema,
        )
    )
    return history.table()


def recorded_run(engine, prompts, samples, params, groups):
    results = engine.generate([p for p in prompts for _ in range(samples)], params, groups)
    history = RolloutHistory()
    history.append_results(results, policy_version=0)
    totals = {
        "forwards": engine.total_forwards,
        "drafted": sum(r.spec.drafted for r in results),
        "accepted": sum(r.spec.accepted for r in results),
        "tokens": sum(len(r.token_ids) for r in results),
    }
    return history.table(), totals


def simulated_totals(trace, budget: str, slots: int, max_tokens: int) -> dict:
    result = simulate(trace, FLAT, make_drafter("suffix"), parse_budget(budget), slots, max_tokens=max_tokens)
    s = result.summary()
    return {"forwards": s["forwards"], "drafted": s["drafted"], "accepted": s["accepted"], "tokens": s["tokens"]}


@pytest.mark.parametrize("budget", ["off", "fixed:4"])
def test_simulated_engine_takes_the_real_engines_steps(tiny_model, budget):
    # 6 prompts x 3 samples through 4 slots: queueing, shared prompts and drafts from siblings all happen.
    engine = make_engine(tiny_model, max_num_seqs=4, drafter=make_drafter("suffix"), budget=parse_budget(budget))
    prompts = [[5 + i, 9, 13, 5 + i, 9] for i in range(6)]
    params = [SamplingParams(temperature=1.0, max_tokens=24, seed=i) for i in range(18)]
    trace, real = recorded_run(engine, prompts, 3, params, [f"p{i // 3}" for i in range(18)])
    assert real["tokens"] > 18
    assert simulated_totals(trace, budget, slots=4, max_tokens=24) == real
    # The negative control: without the completion limit, drafts near a rollout's end are cut there, and the
    # counts move (the test can tell).
    if budget == "fixed:4" and real["drafted"]:
        assert simulated_totals(trace, budget, slots=4, max_tokens=None)["drafted"] <= real["drafted"]


def test_oracle_drafts_and_prices_by_hand():
    prompt, completion = [1, 2, 3], list(range(100, 120))  # 20 tokens
    trace = trace_of([(prompt, completion, "g")])
    oracle = ReferenceDrafter(references={tuple(prompt): completion}, certainty=1.0)
    report = simulate(trace, FLAT, oracle, FixedBudget(4), slots=1).versions[0]
    # A fixed budget drafts beside the prompt too: every forward verifies 4 nodes, all accepted, and emits 5 tokens.
    assert (report.forwards, report.drafted, report.accepted) == (4, 16, 16)
    # Priced by hand: the prefill feeds 3 prompt tokens + 4 nodes at context 0; decode step j (1..3) feeds the last
    # token + 4 nodes, attending the 3 + 5j - 1 tokens before it.
    by_hand = FLAT.step_seconds(3 + 4, 1, 0) + sum(FLAT.step_seconds(1 + 4, 1, 2 + 5 * j) for j in (1, 2, 3))
    assert report.forward_s == pytest.approx(by_hand, rel=1e-12)
    # Without drafts: one token per forward.
    plain = simulate(trace, FLAT, make_drafter("none"), FixedBudget(0), slots=1).versions[0]
    assert (plain.forwards, plain.drafted) == (20, 0) and plain.forward_s > report.forward_s
    assert report.tokens == 20 and report.makespan_s >= report.forward_s


def test_slots_bound_the_batch():
    lengths = [5, 9, 3, 7]
    trace = trace_of([([10 + i, 11], [200 + i] * n, f"g{i}") for i, n in enumerate(lengths)])
    one_slot = simulate(trace, FLAT, make_drafter("none"), FixedBudget(0), slots=1).versions[0]
    all_slots = simulate(trace, FLAT, make_drafter("none"), FixedBudget(0), slots=4).versions[0]
    assert one_slot.steps == sum(lengths)  # one sequence at a time, one token per step
    assert all_slots.steps == max(lengths)  # all at once: the longest sets the makespan
    assert one_slot.forward_s > all_slots.forward_s
    assert all_slots.small_batch_s == pytest.approx(all_slots.makespan_s)  # never more than 8 running


def test_versions_refresh_the_drafter_from_earlier_ones():
    # The same rollouts at versions 0 and 1: version 1's suffix drafter has version 0 in its history.
    rows = [([7, 8, 9], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39] * 2, "g")]
    trace = pa.concat_tables([trace_of(rows, 0), trace_of(rows, 1)])
    versions = simulate(trace, FLAT, make_drafter("suffix"), FixedBudget(8), slots=2).versions
    assert [v.version for v in versions] == [0, 1]
    assert versions[1].accepted > versions[0].accepted
    assert versions[1].forwards < versions[0].forwards


def test_compare_reports_speedup_over_plain_decoding():
    rows = [([7, 8, 9], [30, 31, 32, 33] * 6, "g")] * 2
    trace = pa.concat_tables([trace_of(rows, 0), trace_of(rows, 1)])
    report = compare(trace, FLAT, ("suffix",), ("fixed:4",), slots=2)
    assert report["off"]["drafted"] == 0
    entry = report["suffix"]["fixed:4"]
    assert entry["speedup_vs_off"] == pytest.approx(report["off"]["makespan_s"] / entry["makespan_s"], abs=1e-3)
    assert entry["speedup_vs_off"] > 1.0  # a repeating rollout is drafted well from its history


def test_profile_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="forward"):
        Profile.from_dict({"name": "x"})
    with pytest.raises(ValueError, match="forward.kind"):
        Profile.from_dict({"forward": {"kind": "cubic"}})
    with pytest.raises(ValueError, match="forward \\(linear\\)"):
        Profile.from_dict({"forward": {"kind": "linear", "base_s": 0.01}})  # per_token_s missing
    with pytest.raises(ValueError, match="base_s must be a number"):
        Profile.from_dict({"forward": {"base_s": "fast", "per_token_s": 0.0}})
    with pytest.raises(ValueError, match="host"):
        Profile.from_dict({"forward": {"base_s": 0.01, "per_token_s": 0.0}, "host": {"drafter_us": 3}})
    with pytest.raises(FileNotFoundError, match="h100_llama3_8b_vllm"):
        load_profile("no-such-profile")
    with pytest.raises(ValueError, match="cpu"):
        load_profile("cpu")
    with pytest.raises(ValueError, match="slots"):
        simulate(trace_of([([1], [2], "g")]), FLAT, make_drafter("none"), FixedBudget(0), slots=0)
    with pytest.raises(ValueError, match="token_ids"):
        simulate(pa.table({"policy_version": [0]}), FLAT, make_drafter("none"), FixedBudget(0))
    # A profile round-trips through its dict form.
    assert Profile.from_dict(FLAT.to_dict()).step_seconds(10, 2, 100) == FLAT.step_seconds(10, 2, 100)


def test_published_gpu_profile_reproduces_its_sources():
    profile = load_profile("h100_llama3_8b_vllm")
    checks = profile.meta["checks"]
    assert len(checks) >= 2 and all(c["source"].startswith("http") for c in checks)
    for c in checks:
        modelled = profile.step_seconds(c["batch"], c["batch"], c["batch"] * c["context"])
        assert modelled == pytest.approx(c["step_s"], rel=0.2), c
    # The budget's cost model is the same line, probed as the engine probes (t(M, B) grows with M and B).
    grid = profile.forward.cost_model()
    assert grid(64, 64) > grid(1, 1) and grid(128, 64) > grid(64, 64)


def test_cli_simulate_prints_and_writes(tmp_path, capsys):
    profile = tmp_path / "flat.yaml"
    profile.write_text(json.dumps(FLAT.to_dict()))  # YAML is a superset of JSON
    out = tmp_path / "sim.json"
    rc = main(["simulate", TRACE, "--cost", str(profile), "--budget", "fixed:4", "--slots", "32", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fixed:4" in printed and "off" in printed
    report = json.loads(out.read_text())
    assert report["slots"] == 32 and report["results"]["suffix"]["fixed:4"]["speedup_vs_off"] > 1.0
    assert main(["simulate", TRACE, "--cost", str(profile), "--slots", "0"]) == 2
    assert "slots" in capsys.readouterr().err
    assert main(["simulate", TRACE, "--cost", "nope"]) == 2
    assert "cost profile" in capsys.readouterr().err


@pytest.mark.slow
def test_simulator_on_smollm2_takes_the_engines_steps_and_measures_its_profile(smol_model, smol_tokenizer):
    from rollout.checkpoint import resolve_model
    from rollout.config import EngineConfig
    from rollout.engine.cost_probe import cost_model_file, measure_cost_model
    from rollout.engine_profile import measure_engine_profile
    from rollout.tasks import chat_prompt_ids, list_tasks

    prompts = [chat_prompt_ids(smol_tokenizer, t.prompt) for t in list_tasks(4, seed=3)]
    engine = make_engine(smol_model, max_num_seqs=8, drafter=make_drafter("suffix"), budget=parse_budget("fixed:4"))
    params = [SamplingParams(temperature=0.6, max_tokens=48, seed=i) for i in range(16)]
    trace, real = recorded_run(engine, prompts, 4, params, [f"p{i // 4}" for i in range(16)])
    assert real["accepted"] > 0
    assert simulated_totals(trace, "fixed:4", slots=8, max_tokens=48) == real
    # The `cpu` profile: the engine's own probe (the budget's cost model) plus the context and host terms.
    config = EngineConfig(max_num_seqs=8, max_model_len=SMOL_MAX_LEN)
    profile = measure_engine_profile(config)
    folder = resolve_model(config.model)
    assert profile.forward.cost_model().grid == measure_cost_model(smol_model, 8, cost_model_file(folder, config)).grid
    # The context term is measured (two contexts, the same forwards): attending more context costs more.
    assert profile.forward.per_context_token_s > 0 and profile.engine_us_per_seq_step >= 0
    # The speed index taken at calibration is kept; taken now on the same machine, it is of the same order.
    from rollout.engine_profile import speed_index

    now = speed_index(smol_model)
    assert 0 < now and 0.2 < now / profile.meta["speed_index_s"] < 5
    result = simulate(
        trace, profile, make_drafter("suffix"), parse_budget("auto", cost=profile.forward.cost_model()), 8
    )
    assert result.makespan_s > result.summary()["forward_s"] > 0


@pytest.mark.parametrize("forward", ["linear", "grid"])
def test_a_profile_scaled_to_a_slower_machine_prices_every_step_that_much_dearer(forward):
    from rollout.step_cost import GridForward

    if forward == "linear":
        profile = FLAT
    else:
        grid = cost_from_function(lambda m, b: 0.004 + 0.0002 * b + 0.00003 * m)
        profile = Profile("grid", GridForward(grid, 1.2, 1e-6, 2e-4), 40.0, 300.0, 25.0)
    slower = profile.scaled(1.5)
    for tokens, seqs, context, accepted, ragged in [(1, 1, 200, 0, 0), (64, 16, 4096, 20, 9), (300, 64, 9000, 90, 0)]:
        base = profile.step_seconds(tokens, seqs, context, accepted, ragged)
        assert slower.step_seconds(tokens, seqs, context, accepted, ragged) == pytest.approx(1.5 * base, rel=1e-12)
    if forward == "grid":  # the probe's grid stays as measured; the scale carries the machine's speed
        assert slower.forward.cost_model() is profile.forward.cost_model()
    assert profile.scaled(1.0) == profile
    with pytest.raises(ValueError, match="speed factor must be above 0"):
        profile.scaled(0.0)


def test_grid_forward_prices_padded_rows_at_the_probes_price_and_linear_pads_nothing():
    """A ragged step is read off the grid at its tokens plus its padded rows times the probe's padded price (the
    budget's own pricing, rollout/budget.py); nothing padded, or varlen attention (linear), leaves it at its tokens."""
    from rollout.cost_model import CostModel
    from rollout.step_cost import GridForward, padded_rows

    plain = cost_from_function(lambda m, b: 0.004 + 0.0002 * b + 0.00003 * m)
    grid = CostModel(plain.grid, padded={4: 0.25, 16: 0.5})
    forward = GridForward(grid, 1.1)
    lengths = [0, 4, 1, 2]  # 4 sequences, drafts padded to 4: 20 rows, 11 tokens
    tokens, rows = len(lengths) + sum(lengths), padded_rows(lengths)
    assert (tokens, rows) == (11, 20)
    assert forward.seconds(tokens, 4, 4 * 128, rows=rows) == pytest.approx(1.1 * grid(11 + 0.25 * 9, 4))
    assert forward.seconds(tokens, 4, 4 * 128, rows=rows) > forward.seconds(tokens, 4, 4 * 128)
    equal = [3, 3, 3, 3]
    assert forward.seconds(16, 4, 512, rows=padded_rows(equal)) == forward.seconds(16, 4, 512)
    assert forward.priced_tokens(24, 8, 40) == pytest.approx(24 + grid.padded_price(8) * 16)
    assert 0.25 < grid.padded_price(8) < 0.5
    assert FLAT.step_seconds(tokens, 4, 512, rows=rows) == FLAT.step_seconds(tokens, 4, 512)


def test_nonnegative_fit_recovers_coefficients_and_drops_negative_ones():
    from rollout.engine_profile import nonnegative_fit

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (200, 3))
    y = x @ np.array([2.0, 0.5, 0.0]) + rng.normal(0, 1e-3, 200)
    assert nonnegative_fit(x, y) == pytest.approx([2.0, 0.5, 0.0], abs=0.01)
    # A feature that would take a negative coefficient is dropped and the others refitted.
    y = x @ np.array([1.0, -0.5, 0.0])
    coef = nonnegative_fit(x, y)
    assert (coef >= 0).all() and coef[1] == 0.0
