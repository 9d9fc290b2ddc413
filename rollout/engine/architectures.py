"""The Llama family as one shape description, read from a transformers config.

Llama, Mistral, Qwen2/2.5, Qwen3 and SmolLM2 share one decoder: RMSNorm -> GQA attention with RoPE -> RMSNorm ->
SwiGLU MLP. They differ in a few switches (q/k RMSNorm in Qwen3, q/k/v biases in Qwen2, sliding windows in Mistral),
which are data here rather than subclasses. Biases are detected from the checkpoint's tensor names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ArchSpec:
    """What distinguishes one member of the family from plain Llama."""

    qk_norm: bool = False  # Qwen3 normalises each head of q and k before RoPE


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(),
    "MistralForCausalLM": ArchSpec(),
    "Qwen2ForCausalLM": ArchSpec(),
    "Qwen3ForCausalLM": ArchSpec(qk_norm=True),
}

# RoPE variants whose frequencies depend only on the config; 'dynamic' and 'longrope' change with the sequence
# length, which a KV cache shared by sequences of different lengths cannot honour exactly.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    qk_norm: bool

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def shape_from_config(config, max_model_len: int) -> ModelShape:
    """Validate a transformers config against what the embedded engine implements."""
    archs = getattr(config, "architectures", None) or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise NotImplementedError(
            f"architecture {archs or config.model_type!r} is not supported by the embedded engine; supported: "
            f"{', '.join(ARCHITECTURES)}. Use the vLLM engine (engine.backend=vllm) for other models."
        )
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and getattr(config, "use_sliding_window", True) is not False
    if uses_window and window < max_model_len:
        raise NotImplementedError(
            f"{arch} uses a sliding attention window of {window} tokens; the embedded engine attends to the full "
            f"context, so set engine.max_model_len <= {window} (it is {max_model_len})"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"hidden_act={config.hidden_act!r}: the embedded engine implements SwiGLU (silu)")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        architecture=arch,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_position_embeddings=getattr(config, "max_position_embeddings", max_model_len),
        qk_norm=ARCHITECTURES[arch].qk_norm,
    )


def rope_tables(config, shape: ModelShape, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim] computed exactly as transformers' rotary embedding does."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:  # transformers < 5 kept these as two attributes
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise NotImplementedError(f"rope_type={rope_type!r} is not supported; supported: {STATIC_ROPE_TYPES}")
    if rope_type == "default":
        base = params["rope_theta"]
        dim = shape.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    positions = torch.arange(max_len, dtype=torch.float)
    freqs = positions[:, None] * inv_freq[None, :].float()  # [max_len, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim]
    return emb.cos() * scaling, emb.sin() * scaling
