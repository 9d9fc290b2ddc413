"""TRL's real GRPOTrainer driving specrollout through adapters/trl.py; the task rewards."""

from __future__ import annotations

import pytest
import torch

from adapters.trl import make_rollout_func, render_prompt, sampling_params_from
from rollout.tasks import CopyTask, Task, copy_tasks

trl = pytest.importorskip("trl")


# ---------------------------------------------------------------------------------------------- rewards

COPY = CopyTask("Copy the following words, separated by commas: river, stone, cloud", ("river", "stone", "cloud"))

COPY_CASES = [
    ("river, stone, cloud", 1.0),  # exactly the list
    ("river, stone, cloud.", 1.0),  # a final period is fine
    ("River, Stone, Cloud", 0.8),  # all words in order, wrong case: not the exact format
    ("Sure! river, stone, cloud", 0.8 - 0.2 / 3),  # one surplus word
    ("stone, river", 0.8 / 3),  # one word in order (LCS 1)
    ("", 0.0),  # nothing
    ("12345 !!!", 0.0),  # malformed: no words at all
]


@pytest.mark.parametrize("completion,expected", COPY_CASES)
def test_copy_reward(completion, expected):
    assert COPY.reward(completion) == pytest.approx(expected)


def test_count_reward():
    task = Task("List the integers from 3 to 6", (3, 4, 5, 6))
    assert task.reward("3, 4, 5, 6") == 1.0
    assert task.reward("3, 4, 9") == pytest.approx(0.5 * 2 / 4)  # right prefix of two
    assert task.reward("three, four") == 0.0  # malformed
    assert task.reward("Here: 3, 4, 5, 6") == 0.0  # anything around the list is malformed


def test_copy_tasks_are_seeded():
    assert copy_tasks(5, seed=1) == copy_tasks(5, seed=1) != copy_tasks(5, seed=2)


# ---------------------------------------------------------------------------------------------- mapping


def test_sampling_fields_map_and_unsupported_ones_are_refused():
    from trl import GRPOConfig

    args = GRPOConfig(
        output_dir="/tmp/x",
        use_cpu=True,
        bf16=False,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        max_completion_length=33,
        report_to=[],
    )
    p = sampling_params_from(args, seed=5)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed) == (0.7, 0.9, 20, 33, 5)
    args.min_p = 0.1
    with pytest.raises(ValueError, match="min_p=0.1 is not supported"):
        sampling_params_from(args)
    args.min_p, args.repetition_penalty = None, 1.2
    with pytest.raises(ValueError, match="repetition_penalty=1.2 is not supported"):
        sampling_params_from(args)


def test_render_prompt(smol_tokenizer):
    chat = render_prompt(smol_tokenizer, [{"role": "user", "content": "hi"}])
    assert smol_tokenizer.decode(chat).endswith("<|im_start|>assistant\n")
    assert render_prompt(smol_tokenizer, "hi") == smol_tokenizer("hi")["input_ids"]


# ---------------------------------------------------------------------------------------------- the trainer


def test_sampling_seed_changes_only_the_rollouts_seeds(smol_tokenizer):
    """bench-rl's noise run: another sampling_seed gives every request another seed, the same prompts and groups."""
    from types import SimpleNamespace

    class Recorder:  # stands in for the service: this test is about the requests the adapter builds
        def __init__(self):
            self.requests = []

        def generate(self, requests, plain=False):
            self.requests += requests
            return []

        def stats(self):  # no engine replicas to report on
            return []

    trainer = SimpleNamespace(
        args=SimpleNamespace(seed=3, temperature=1.0, max_completion_length=8),
        state=SimpleNamespace(global_step=0),
        processing_class=smol_tokenizer,
        num_generations=2,
    )
    prompts = [[{"role": "user", "content": "Copy: a, b"}]] * 2 + [[{"role": "user", "content": "Copy: c"}]] * 2
    made = {}
    for sampling_seed in (None, 3, 4):
        service = Recorder()
        make_rollout_func(service, sampling_seed=sampling_seed)(prompts, trainer)
        made[sampling_seed] = service.requests
    assert [r.params.seed for r in made[None]] == [r.params.seed for r in made[3]], "None: the trainer's seed"
    other = made[4]
    assert all(a.params.seed != b.params.seed for a, b in zip(made[3], other))
    assert len({r.params.seed for r in other}) == 4, "each sample of a group keeps its own seed"
    for a, b in zip(made[3], other):
        assert (a.prompt_token_ids, a.group) == (b.prompt_token_ids, b.group)
        assert a.params.temperature == b.params.temperature


@pytest.mark.slow
def test_grpo_trainer_with_our_rollout_func(smol_folder, smol_tokenizer, tmp_path):
    """Two real GRPO steps on SmolLM2: rollouts have TRL's shapes, the trained weights reach the service."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from rollout.config import load_config
    from rollout.service import LocalService

    service = LocalService(load_config(None, ["engine.max_model_len=256", "speculation.budget=fixed:4"]))
    probe = [[{"role": "user", "content": "Copy the following words, separated by commas: river, stone, cloud"}]]
    greedy = sampling_params_from(type("A", (), {"temperature": 0.0, "max_completion_length": 12})())
    from rollout.worker import RolloutRequest

    ids = render_prompt(smol_tokenizer, probe[0])
    before = service.generate([RolloutRequest("b", ids, greedy)])[0].token_ids

    model = AutoModelForCausalLM.from_pretrained(smol_folder, dtype=torch.float32)
    tasks = copy_tasks(4, seed=0)
    rows = [{"prompt": [{"role": "user", "content": t.prompt}], "i": i} for i, t in enumerate(tasks)]
    dataset = Dataset.from_list(rows * 4)

    def reward(completions, i, **kwargs):
        return [tasks[k].reward(c[-1]["content"]) for c, k in zip(completions, i)]

    calls = []
    func = make_rollout_func(service, on_rollouts=lambda results, stats: calls.append((results, stats)))
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        max_steps=2,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=16,
        learning_rate=1e-3,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=dataset,
        processing_class=smol_tokenizer,
        rollout_func=func,
    )
    trainer.train()

    assert [s.step for _, s in calls] == [0, 1]
    assert [s.policy_version for _, s in calls] == [0, 1], "step 1's rollouts come from the weights after step 1"
    for results, stats in calls:
        assert stats.sequences == 8 and all(len(r.logprobs) == len(r.token_ids) <= 16 for r in results)
        assert len({r.prompt_token_ids[-5] for r in results[:4]}) == 1, "a group's samples share their prompt"
    assert len([h for h in trainer.state.log_history if "reward" in h]) == 2
    # Step 0's rollouts came from the initial weights: their logprobs are the policy's (T=1), per one full forward.
    initial = AutoModelForCausalLM.from_pretrained(smol_folder, dtype=torch.float32)
    worst = 0.0
    for r in calls[0][0]:
        with torch.no_grad():
            logits = initial(torch.tensor([r.prompt_token_ids + r.token_ids])).logits[0].float()  # [L, V]
        n = len(r.token_ids)
        ref = logits[-n - 1 : -1].log_softmax(-1).gather(1, torch.tensor(r.token_ids)[:, None]).squeeze(1)
        worst = max(worst, (torch.tensor(r.logprobs) - ref).abs().max().item())
    assert worst < 1e-3, f"our logprobs are the trainer's own policy's, max |diff| = {worst:.2e}"

    func._sync(trainer)  # push the final weights as the next rollout would
    assert service.policy_version == 2
    views = service.engine.model._views
    for name, param in model.named_parameters():
        assert torch.equal(views[name], param.detach()), name
    after = service.generate([RolloutRequest("a", ids, greedy)])[0].token_ids
    assert after != before, "a lr of 1e-3 for two steps visibly moves the greedy continuation"


@pytest.mark.slow
def test_specrollout_run_quick(tmp_path):
    """README command 1 in its quick form, end to end: local Ray, TRL, plots, trace."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "rollout.cli", "run", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled"),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "GRPO steps" in run.stdout
    # One line per step on the terminal; TRL's per-step dicts and library warnings go to the log file instead.
    step_lines = [line for line in run.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in step_lines] == ["1/4", "2/4", "3/4", "4/4"], run.stdout[-3000:]
    assert all("reward" in line and "rollout" in line for line in step_lines)
    assert "'loss'" not in run.stdout + run.stderr and "FutureWarning" not in run.stdout + run.stderr
    assert "'loss'" in (out / "train.log").read_text()
    for name in ("metrics.parquet", "metrics.png", "trace.parquet", "summary.json"):
        assert (out / name).exists(), name
    import pyarrow.parquet as pq

    metrics = pq.read_table(out / "metrics.parquet").to_pylist()
    assert len(metrics) == 4 and all(m["reward"] is not None for m in metrics)
    # trace.parquet holds every step's rollouts, and the simulator reads it (README: what it would give on a GPU).
    trace = pq.read_table(out / "trace.parquet")
    assert len(set(trace["policy_version"].to_pylist())) == 4 and trace.num_rows == len(metrics) * 2 * 4
    from rollout.cli import main

    assert main(["simulate", str(out / "trace.parquet"), "--cost", "h100_llama3_8b_vllm", "--budget", "fixed:4"]) == 0
