#!/usr/bin/env bash
# Submit a rollout job to a Ray cluster: here a local head on 127.0.0.1, started and stopped by this script.
#   bash examples/ray_job.sh [OUT.parquet]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-runs/ray_job_rollouts.parquet}")
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1

ray start --head --node-ip-address=127.0.0.1 --port=6390 --dashboard-host=127.0.0.1 --dashboard-port=8265 \
  --num-cpus="$(nproc)" --disable-usage-stats
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT

# The job runs inside the cluster; --working-dir ships this checkout (without virtualenvs and outputs).
ray job submit --address=http://127.0.0.1:8265 --working-dir=. \
  --runtime-env-json='{"excludes": [".venv", ".ci-venv", ".git", "runs", "benchmarks/traces"], "env_vars": {"HF_HUB_OFFLINE": "1"}}' \
  -- python -m rollout.cli generate --config configs/default.yaml --prompts examples/prompts.jsonl \
     --out "$out" --max-tokens 64 cluster.ray_address=auto speculation.budget=fixed:4
echo "rollouts: $out"
