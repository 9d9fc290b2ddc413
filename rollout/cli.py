"""The `specrollout` command."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def _offline() -> None:
    # specrollout never reaches a hub; make transformers fail fast instead of trying.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _rl_config(args: argparse.Namespace, **extra):
    from rollout.rl import RLConfig

    fields = dict(task=args.task, seed=args.seed, out_dir=args.out, use_ray=not args.local, **extra)
    for name in ("steps", "prompts_per_step", "num_generations", "max_completion_length", "learning_rate"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    return RLConfig.quick(**fields) if args.quick else RLConfig(**fields)


def _service_config(args: argparse.Namespace):
    import os

    from rollout.config import load_config

    # One replica using every core: on a small machine the trainer and the engine take turns, not cores.
    defaults = [f"cluster.num_cpus_per_worker={os.cpu_count() or 1}", "cluster.num_workers=1"]
    return load_config(args.config, defaults + list(args.overrides))


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: GRPO with TRL through the rollout service on the embedded default."""
    from rollout.rl import run_grpo

    cfg = _rl_config(args, save_policy=args.save_policy)
    result = run_grpo(cfg, _service_config(args))
    s = result.summary()
    print(
        f"\n{s['steps']} GRPO steps in {s['seconds']:.0f}s. reward {s['reward_first3']} -> {s['reward_last3']}; "
        f"entropy {s['entropy_first3']} -> {s['entropy_last3']}; acceptance length "
        f"{s['acceptance_length_first3']} -> {s['acceptance_length_last3']}; rollout tok/s "
        f"{s['tokens_per_s_first3']} -> {s['tokens_per_s_last3']}"
    )
    print(
        f"metrics: {result.out_dir / 'metrics.parquet'}, plot: {result.out_dir / 'metrics.png'}, "
        f"trace: {result.out_dir / 'trace.parquet'} (specrollout replay it)"
    )
    return 0


def cmd_bench_rl(args: argparse.Namespace) -> int:
    """Training with a plain-decoding twin of every step, then a second run without speculation."""
    from benchmarks.rl import run_benchmark

    run_benchmark(_rl_config(args), _service_config(args), reuse_baselines=args.reuse_baselines)
    return 0


def _parse_options(pairs: list[str]) -> dict:
    """--option key=value pairs; values parsed as YAML scalars (numbers, booleans, strings)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects key=value, got {pair!r}")
        options[key] = yaml.safe_load(value)
    return options


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay a recorded trace through one or more drafters and print acceptance figures."""
    import json

    from drafters.base import make_drafter
    from drafters.replay import replay
    from rollout.history import RolloutHistory, warm_start

    trace = RolloutHistory.load(args.trace)
    warm = None
    if args.warm_start:
        warm = RolloutHistory()
        warm_start(warm, args.warm_start, 0)  # replay renumbers them again, to end before the trace's first version
        warm = warm.table()
    options = _parse_options(args.option)
    report = {}
    for name in args.drafter:
        stats = replay(trace, make_drafter(name, **options), args.max_draft_tokens, name=name, warm=warm)
        report[name] = stats.summary()
        print(
            f"{name:>14}: acceptance length {stats.acceptance_length:.3f} | tokens per batched forward "
            f"{stats.tokens_per_forward:.2f} | drafted {stats.drafted} rejected {stats.rejected} | "
            f"drafting {stats.host_us_percentile(50):.1f} us per sequence-step (p50; p99 "
            f"{stats.host_us_percentile(99):.1f}), {stats.draft_us_per_token:.1f} us per token"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Makespan of a recorded trace per drafter and budget on the hardware a cost profile describes."""
    import json

    from rollout.config import EngineConfig
    from rollout.engine_profile import measure_engine_profile
    from rollout.history import RolloutHistory, warm_start
    from rollout.simulator import BUDGETS, compare
    from rollout.step_cost import load_profile

    if args.slots < 1:
        raise ValueError(f"--slots must be at least 1, got {args.slots}")
    trace = RolloutHistory.load(args.trace).table()
    warm = None
    if args.warm_start:
        history = RolloutHistory()
        warm_start(history, args.warm_start, 0)  # renumbered again to end before the trace's first version
        warm = history.table()
    engine = EngineConfig(model=args.model, max_num_seqs=args.slots, max_model_len=args.max_model_len)
    profile = load_profile(args.cost, cpu=lambda: measure_engine_profile(engine, log=print))
    drafters = tuple(args.drafter or ["suffix"])
    budgets = tuple(args.budget or BUDGETS)
    options = _parse_options(args.option)
    report = compare(
        trace,
        profile,
        drafters,
        budgets,
        args.slots,
        warm,
        args.max_draft_tokens,
        options,
        args.max_tokens,
        args.window_versions,
    )
    off = report["off"]
    print(f"profile {profile.name}: {off['sequences']} rollouts, {off['tokens']} tokens, {args.slots} slots")
    head = ("drafter", "budget", "makespan s", "speedup", "tok/fwd", "<=8 share", "host us")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (14, 8, 11, 8, 8, 9, 8))))
    rows = [("-", "off", off)] + [(d, b, r) for d in drafters for b, r in report[d].items()]
    for drafter, budget, r in rows:
        print(
            f"{drafter:>14} {budget:>8} {r['makespan_s']:>11.3f} {r.get('speedup_vs_off', 1.0):>7.2f}x "
            f"{r['tokens_per_forward']:>8.2f} {r['small_batch_share']:>9.2f} {r['host_us_per_seq_step']:>8.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"profile": profile.to_dict(), "slots": args.slots, "results": report}, f, indent=1)
    return 0


def _read_prompts(path: str) -> list[dict]:
    """JSONL, one prompt per line: {"prompt": text} | {"messages": [...]} | {"prompt_ids": [...]}, plus optional
    "id", "n", "temperature", "top_p", "top_k", "max_tokens", "seed". Errors name the line."""
    import json

    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not ({"prompt", "messages", "prompt_ids"} & set(row)):
                raise ValueError(f"{path}:{lineno}: each line needs one of 'prompt', 'messages' or 'prompt_ids'")
            row.setdefault("id", str(lineno))
            rows.append(row)
    return rows


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate rollouts for a JSONL file of prompts on the Ray service; resumable, Parquet out."""
    from pathlib import Path

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from rollout.checkpoint import resolve_model
    from rollout.cluster import RolloutCluster
    from rollout.config import load_config
    from rollout.history import RolloutHistory
    from rollout.sampling import SamplingParams
    from rollout.worker import RolloutRequest

    config = load_config(args.config, args.overrides)
    rows = _read_prompts(args.prompts)
    out = Path(args.out)
    done: set[str] = set()
    history = RolloutHistory()
    if out.exists():  # resume: keep what is there, skip prompts whose samples are all present
        history = RolloutHistory.load(out)
        counts: dict[str, int] = {}
        for rid in history.table()["request_id"].to_pylist():
            counts[rid.rsplit(":", 1)[0]] = counts.get(rid.rsplit(":", 1)[0], 0) + 1
        done = {str(r["id"]) for r in rows if counts.get(str(r["id"]), 0) >= int(r.get("n", args.n))}
        print(f"resuming {out}: {len(done)} of {len(rows)} prompts already done")
    todo = [r for r in rows if str(r["id"]) not in done]
    if not todo:
        print("nothing to do")
        return 0
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.engine.model))

    def prompt_ids(row: dict) -> list[int]:
        if "prompt_ids" in row:
            return list(row["prompt_ids"])
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        if args.raw and "prompt" in row:
            return tokenizer(row["prompt"]).input_ids
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    cluster = RolloutCluster(config)
    bar = tqdm(total=sum(int(r.get("n", args.n)) for r in todo), unit="rollout")
    try:
        for start in range(0, len(todo), args.chunk):
            reqs = []
            for row in todo[start : start + args.chunk]:
                ids = prompt_ids(row)
                for i in range(int(row.get("n", args.n))):
                    params = SamplingParams(
                        temperature=float(row.get("temperature", args.temperature)),
                        top_p=float(row.get("top_p", args.top_p)),
                        top_k=int(row.get("top_k", 0)),
                        max_tokens=int(row.get("max_tokens", args.max_tokens)),
                        seed=int(row["seed"]) + i if "seed" in row else None,
                    )
                    reqs.append(RolloutRequest(f"{row['id']}:{i}", ids, params, group=str(row["id"])))
            results = cluster.generate(reqs)
            history.append_results(results)
            history.save(out)  # after every chunk: a rerun resumes from here
            bar.update(len(results))
    finally:
        bar.close()
        cluster.shutdown()
    print(f"wrote {history.num_rows} rollouts to {out}")
    return 0


def _sigterm_as_interrupt() -> None:
    """SIGTERM (kill, docker stop, systemd) stops `serve` as Ctrl-C does. Without this, Ray's driver handler turns it
    into an exit with status 15; uvicorn, which catches both while it serves, raises the signal again once it has
    shut down, and this handler then ends the command the way SIGINT does."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cmd_serve(args: argparse.Namespace) -> int:
    """Bring the rollout cluster up and keep it serving until interrupted (over HTTP with --http); SIGTERM and SIGINT
    both stop it: new requests refused, those in flight aborted after --shutdown-grace seconds, exit status 0."""
    from rollout.cluster import RolloutCluster
    from rollout.config import load_config

    config = load_config(args.config, args.overrides)
    server_config = None
    if args.http:  # checked before the cluster starts: a bad limit fails in a second, not after the model loads
        from adapters.vllm_server import ServerConfig

        server_config = ServerConfig(
            host=args.host,
            port=args.port,
            api_key=args.api_key or None,
            max_n=args.max_n,
            max_queued_seqs=args.max_queued_seqs,
            shutdown_grace_s=args.shutdown_grace,
        )
    _sigterm_as_interrupt()
    cluster = None
    try:
        cluster = RolloutCluster(config)
        _sigterm_as_interrupt()  # ray.init installed its own
        for h in cluster.health():
            print(f"worker {h['worker']}: pid {h['pid']}, policy version {h['policy_version']}")
        if server_config is not None:
            from transformers import AutoTokenizer

            from adapters.vllm_server import CompletionServer, serve
            from rollout.checkpoint import resolve_model

            tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.engine.model))
            server = CompletionServer(cluster, tokenizer, server_config, model_name=config.engine.model)
            key = "an API key" if server_config.api_key else "no API key"
            print(f"vLLM-compatible API on http://{args.host}:{args.port} (model {server.model_name!r}, {key})")
            serve(server)
        else:
            print("serving; Ctrl-C to stop")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if cluster is not None:
            cluster.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specrollout", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def rl_arguments(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument("--config", default="configs/default.yaml")
        p.add_argument("--quick", action="store_true", help="a few small steps (about a minute)")
        p.add_argument("--task", default="tail", choices=["tail", "copy", "count"])
        p.add_argument("--steps", type=int)
        p.add_argument("--prompts-per-step", type=int)
        p.add_argument("--num-generations", type=int)
        p.add_argument("--max-completion-length", type=int)
        p.add_argument("--learning-rate", type=float)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--local", action="store_true", help="run the engine in this process instead of on Ray")
        p.add_argument("--out", default=out)
        p.add_argument("overrides", nargs="*", help="service config overrides, e.g. speculation.budget=fixed:4")

    run = sub.add_parser("run", help="the main job: GRPO with TRL through specrollout on the embedded default")
    rl_arguments(run, "runs/grpo")
    run.add_argument("--save-policy", action="store_true", help="also save the trained policy under OUT/policy")
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench-rl", help="GRPO with per-step speedup against plain decoding, and a no-spec run")
    rl_arguments(bench, "runs/bench-rl")
    bench.add_argument(
        "--reuse-baselines",
        action="store_true",
        help="take the two runs without speculation from an earlier bench-rl with the same settings",
    )
    bench.set_defaults(func=cmd_bench_rl)

    rep = sub.add_parser("replay", help="replay a rollout trace (Parquet) through drafters, without the model")
    rep.add_argument("trace", help="Parquet file written by RolloutHistory.save / specrollout run")
    rep.add_argument("--drafter", action="append", default=None, help="drafter name or dotted path (repeatable)")
    rep.add_argument("--max-draft-tokens", type=int, default=8)
    rep.add_argument("--option", action="append", default=[], help="drafter option key=value (repeatable)")
    rep.add_argument("--json", help="also write the figures to this JSON file")
    rep.add_argument(
        "--warm-start",
        action="append",
        default=[],
        help="earlier trace the history starts with, as history.warm_start loads it (repeatable)",
    )
    rep.set_defaults(func=cmd_replay)

    sim = sub.add_parser(
        "simulate", help="makespan of a recorded trace per drafter and budget on a cost profile's hardware"
    )
    sim.add_argument("trace", help="Parquet rollout history (specrollout run's trace.parquet)")
    sim.add_argument(
        "--cost",
        default="cpu",
        help="cost profile: 'cpu' (this machine, measured once), a name under configs/profiles/, or a YAML file",
    )
    sim.add_argument("--drafter", action="append", help="drafter name (repeatable; default suffix)")
    sim.add_argument("--budget", action="append", help="budget: fixed:K | auto (repeatable; off always runs)")
    sim.add_argument("--slots", type=int, default=64, help="KV slots: sequences decoded together (default 64)")
    sim.add_argument("--max-draft-tokens", type=int, default=16)
    sim.add_argument(
        "--max-tokens",
        type=int,
        help="the rollouts' completion limit, which bounds drafts (default: each one's length)",
    )
    sim.add_argument("--option", action="append", default=[], help="drafter option key=value (repeatable)")
    sim.add_argument(
        "--window-versions", type=int, default=8, help="policy versions the drafter's history keeps (default 8)"
    )
    sim.add_argument("--model", default="smollm2-135m", help="the model the 'cpu' profile is measured with")
    sim.add_argument("--max-model-len", type=int, default=512, help="the 'cpu' profile's engine length limit")
    sim.add_argument("--warm-start", action="append", default=[], help="earlier trace the history starts with")
    sim.add_argument("--json", help="also write the figures to this JSON file")
    sim.set_defaults(func=cmd_simulate)

    gen = sub.add_parser("generate", help="generate rollouts for a JSONL of prompts on the Ray service (resumable)")
    gen.add_argument("--config", default="configs/default.yaml")
    gen.add_argument("--prompts", required=True, help="JSONL: prompt | messages | prompt_ids, optional id, n, ...")
    gen.add_argument("--out", required=True, help="Parquet file; rerunning skips prompts already in it")
    gen.add_argument("--n", type=int, default=1, help="samples per prompt unless the line says")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--chunk", type=int, default=16, help="prompts per checkpoint of the output file")
    gen.add_argument("--raw", action="store_true", help="tokenize 'prompt' as plain text, no chat template")
    gen.add_argument("overrides", nargs="*", help="config overrides, e.g. speculation.budget=fixed:4")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="bring the rollout cluster up and wait")
    srv.add_argument("--config", default="configs/default.yaml")
    srv.add_argument("--http", action="store_true", help="serve vLLM's HTTP API (TRL's VLLMClient) on --host:--port")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless you open it up)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--api-key",
        default=os.environ.get("SPECROLLOUT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $SPECROLLOUT_API_KEY)",
    )
    srv.add_argument("--max-n", type=int, default=64, help="most completions per prompt in one request (else a 400)")
    srv.add_argument(
        "--max-queued-seqs",
        type=int,
        default=4096,
        help="most completions queued or running across requests (beyond: a 429; one request over it: a 400)",
    )
    srv.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        help="seconds requests in flight get to finish on SIGTERM/SIGINT before they are aborted",
    )
    srv.add_argument("overrides", nargs="*", help="config overrides, e.g. cluster.num_workers=2")
    srv.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline()
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "replay" and not args.drafter:
        args.drafter = ["suffix"]
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, NotImplementedError) as exc:
        print(f"specrollout: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
