"""The Llama family's decoder, as data and pure functions: its shape, RoPE tables, RMSNorm, rotation, one layer.

Llama, Mistral, Qwen2/2.5, Qwen3 and SmolLM2 share one decoder: RMSNorm -> GQA attention with RoPE -> RMSNorm ->
SwiGLU MLP. They differ in a few switches (q/k RMSNorm in Qwen3, q/k/v biases in Qwen2, sliding windows in Mistral),
which are data here rather than subclasses. Biases are detected from the checkpoint's tensor names.

Why a module of its own, outside rollout/engine/: two forwards run this decoder, the embedded engine's
(rollout/engine/model.py: packed token-major rows, a slot KV cache, products picked per shape) and the parametric
drafter's (drafters/model.py: [batch, time] rows, its own cache, a top layer trained with autograd). They share the
layer math here, so the drafter is the target's layers by construction, not a second copy that has to be kept in
step; each brings only its own attention over its own K/V (`attend`) and its own product (`mm`). Drafters may
depend on this module and on rollout/checkpoint_io.py, never on rollout/engine/ (the engine depends on drafters);
this module imports only torch (and transformers' RoPE initialisers for scaled RoPE, lazily).

Every function works on plain tensors and on nn.Parameters alike and keeps autograd's graph: the drafter trains its
top layer through `decoder_layer`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Mapping

import torch
import torch.nn.functional as F


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim computed in fp32, as transformers' LlamaRMSNorm does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, hd], cos/sin broadcastable to it ([..., 1, hd]): rotate pairs (i, i + hd/2) as transformers'
    rotate_half does, so the layers see the positions they were trained with."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class LayerWeights:
    """One decoder layer's weights, q/k/v and gate/up fused into one product each (transformers names them apart;
    `layer_weights` fuses them)."""

    ln1: torch.Tensor  # [D]
    wqkv: torch.Tensor  # [(H + 2*KVH) * hd, D]
    bqkv: torch.Tensor | None  # [(H + 2*KVH) * hd]
    q_norm: torch.Tensor | None  # [hd]
    k_norm: torch.Tensor | None  # [hd]
    wo: torch.Tensor  # [D, H * hd]
    bo: torch.Tensor | None  # [D]
    ln2: torch.Tensor  # [D]
    w_gate_up: torch.Tensor  # [2 * I, D]
    b_gate_up: torch.Tensor | None  # [2 * I]
    w_down: torch.Tensor  # [D, I]
    b_down: torch.Tensor | None  # [D]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights present, by field name."""
        return {f.name: t for f in fields(self) if (t := getattr(self, f.name)) is not None}


def layer_weights(tensors: Mapping[str, torch.Tensor], prefix: str, shape: ModelShape) -> LayerWeights:
    """The fused weights of the layer whose transformers tensors are `prefix` + name (e.g. "model.layers.3."), as new
    tensors in the checkpoint's dtype. A bias the checkpoint has for some of a fused product's parts is zero for the
    others (the engine allocates them so)."""

    def get(name: str) -> torch.Tensor | None:
        return tensors.get(prefix + name)

    def fused(names: tuple[str, ...], sizes: tuple[int, ...], leaf: str) -> torch.Tensor | None:
        parts = [get(f"{n}.{leaf}") for n in names]
        if all(p is None for p in parts):
            return None
        like = next(p for p in parts if p is not None)
        if leaf == "bias":
            parts = [like.new_zeros(size) if p is None else p for p, size in zip(parts, sizes)]
        return torch.cat(parts, dim=0)

    q, kv, inter = shape.q_size, shape.kv_size, shape.intermediate_size
    attn = tuple(f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj"))
    mlp = ("mlp.gate_proj", "mlp.up_proj")
    return LayerWeights(
        ln1=get("input_layernorm.weight"),
        wqkv=fused(attn, (q, kv, kv), "weight"),
        bqkv=fused(attn, (q, kv, kv), "bias"),
        q_norm=get("self_attn.q_norm.weight"),
        k_norm=get("self_attn.k_norm.weight"),
        wo=get("self_attn.o_proj.weight"),
        bo=get("self_attn.o_proj.bias"),
        ln2=get("post_attention_layernorm.weight"),
        w_gate_up=fused(mlp, (inter, inter), "weight"),
        b_gate_up=fused(mlp, (inter, inter), "bias"),
        w_down=get("mlp.down_proj.weight"),
        b_down=get("mlp.down_proj.bias"),
    )


def linear(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ w[out, in].T: the product `decoder_layer` uses unless given another (the engine's is tuned)."""
    return F.linear(x, w)


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decoder_layer(
    h: torch.Tensor,  # [..., D] hidden states of the new tokens
    w: LayerWeights,
    shape: ModelShape,
    cos: torch.Tensor,  # broadcastable to [..., heads, hd] (e.g. [..., 1, hd])
    sin: torch.Tensor,
    attend: Attend,  # (q [..., H, hd], k [..., KVH, hd], v [..., KVH, hd]) -> [..., H * hd]
    mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = linear,  # (w [out, in], x [..., in]) -> [..., out]
) -> torch.Tensor:
    """One decoder layer: h -> h after attention and MLP, both residual. The caller's `attend` stores the new keys
    and values where its cache keeps them and attends over whichever K/V it holds (q, k already normalised and
    rotated): the layer knows nothing of caches, batches or masks."""
    s = shape
    eps = s.rms_norm_eps
    lead = h.shape[:-1]
    qkv = mm(w.wqkv, rms_norm(h, w.ln1, eps))  # [..., (H + 2*KVH) * hd]
    if w.bqkv is not None:
        qkv = qkv + w.bqkv
    q = qkv[..., : s.q_size].view(*lead, s.num_heads, s.head_dim)  # [..., H, hd]
    k = qkv[..., s.q_size : s.q_size + s.kv_size].view(*lead, s.num_kv_heads, s.head_dim)  # [..., KVH, hd]
    v = qkv[..., s.q_size + s.kv_size :].view(*lead, s.num_kv_heads, s.head_dim)  # [..., KVH, hd]
    if w.q_norm is not None:
        q = rms_norm(q, w.q_norm, eps)
        k = rms_norm(k, w.k_norm, eps)
    q = rope(q, cos, sin)
    k = rope(k, cos, sin)
    o = mm(w.wo, attend(q, k, v))  # [..., D]
    h = h + (o if w.bo is None else o + w.bo)
    inter = s.intermediate_size
    gu = mm(w.w_gate_up, rms_norm(h, w.ln2, eps))  # [..., 2I]
    if w.b_gate_up is not None:
        gu = gu + w.b_gate_up
    d = mm(w.w_down, F.silu(gu[..., :inter]) * gu[..., inter:])  # [..., D]
    return h + (d if w.b_down is None else d + w.b_down)
