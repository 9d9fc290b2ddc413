"""Our own forward for the Llama family, reading a transformers checkpoint and writing a slot KV cache.

Why not call transformers' model: its per-layer Python and cache bookkeeping costs ~80 ms per decode step for
SmolLM2 on this CPU, the weights are streamed once per row on the small-GEMM path, and it has no notion of a batch
where each sequence brings a different number of tokens arranged as a tree. This forward packs all new tokens of a
step into one token-major matrix [M, hidden], picks each product's kernel by measurement (see matmul.py), fuses
q/k/v and gate/up into single products, computes logits only for the rows that need them, and attends over a view
of the slot cache. The layer math itself (rollout/layers.py: decoder_layer) and the checkpoint reading
(rollout/checkpoint_io.py) are shared with the parametric drafter; this module brings the attention and the products.

Logits equal transformers' within fp32 rounding (tests/test_model_parity.py): within 1e-4 with matmul="mkl" (the
kernels transformers uses), within ~2e-4 with the faster default matmul="fast".

On a GPU, "float32" is only fp32 while torch.backends.cuda.matmul.allow_tf32 is False (torch's default). The model
does not change that process-wide switch, which a trainer sharing the process may have set on purpose; with TF32
on, products round their inputs to 10 mantissa bits (fp32 keeps 23), far beyond the fp32 rounding the parity
tests allow. The exactness tests and benchmarks/engine.py switch it off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F

from rollout.checkpoint import cache_dir
from rollout.checkpoint_io import read_tensors, tensor_files
from rollout.engine.batch import ForwardBatch
from rollout.engine.hardware import fingerprint, keep_freed_memory
from rollout.engine.kv_cache import SlotKVCache
from rollout.engine.matmul import MatmulPlan
from rollout.layers import LayerWeights, ModelShape, decoder_layer, rms_norm, rope_tables, shape_from_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_named_tensor(name: str, tensor: Any, expected: Mapping[str, Any], architecture: str) -> str | None:
    """A pushed weight checked against the model's parameters (`expected`: name -> tensor or shape): its name once
    a DDP/DeepSpeed `module.` prefix is dropped, or None for rotary buffers that some checkpoints carry. Raises
    ValueError/TypeError naming the parameter, so a trainer pushing another model's weights changes nothing."""
    name = name.removeprefix("module.")
    if name.endswith("rotary_emb.inv_freq"):
        return None
    target = expected.get(name)
    if target is None:
        raise ValueError(f"unknown parameter {name!r} for {architecture}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"parameter {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
    shape = tuple(getattr(target, "shape", target))
    if tuple(tensor.shape) != shape:
        raise ValueError(f"parameter {name!r}: shape {tuple(tensor.shape)} does not match the model's {shape}")
    if not tensor.is_floating_point():
        raise TypeError(f"parameter {name!r}: dtype {tensor.dtype} is not a floating-point type")
    return name


class TargetModel:
    """The policy's weights and a forward over a ForwardBatch."""

    def __init__(
        self,
        config,
        max_model_len: int,
        dtype: torch.dtype,
        device: torch.device,
        biases: set[str],
        matmul: str = "fast",
    ):
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"engine.device is {str(device)!r}, but this torch ({torch.__version__}) sees no CUDA device; "
                "install a CUDA build of torch or use device='cpu'"
            )
        self.config = config
        self.shape: ModelShape = shape_from_config(config, max_model_len)
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.device = device
        s = self.shape
        qkv = s.q_size + 2 * s.kv_size

        def empty(*size):
            return torch.empty(*size, dtype=dtype, device=device)

        def bias(kind: str, size: int):
            return torch.zeros(size, dtype=dtype, device=device) if kind in biases else None

        self.embed = empty(s.vocab_size, s.hidden_size)
        self.layers = [
            LayerWeights(
                ln1=empty(s.hidden_size),
                wqkv=empty(qkv, s.hidden_size),
                bqkv=bias("qkv", qkv),
                q_norm=empty(s.head_dim) if s.qk_norm else None,
                k_norm=empty(s.head_dim) if s.qk_norm else None,
                wo=empty(s.hidden_size, s.q_size),
                bo=bias("o", s.hidden_size),
                ln2=empty(s.hidden_size),
                w_gate_up=empty(2 * s.intermediate_size, s.hidden_size),
                b_gate_up=bias("gate_up", 2 * s.intermediate_size),
                w_down=empty(s.hidden_size, s.intermediate_size),
                b_down=bias("down", s.hidden_size),
            )
            for _ in range(s.num_layers)
        ]
        self.norm = empty(s.hidden_size)
        self.lm_head = self.embed if s.tie_word_embeddings else empty(s.vocab_size, s.hidden_size)
        cos, sin = rope_tables(config, s, max_model_len)
        self.cos = cos.to(device=device, dtype=dtype)  # [max_len, hd]
        self.sin = sin.to(device=device, dtype=dtype)  # [max_len, hd]
        self.plan = MatmulPlan(device, cache_dir() / "matmul" / f"{fingerprint(device)}.json", matmul)
        self._views = self._param_views()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        max_model_len: int = 2048,
        dtype: str = "float32",
        device: str = "cpu",
        tune: bool = True,
        matmul: str = "fast",
    ) -> "TargetModel":
        from transformers import AutoConfig

        folder = Path(folder)
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        config = AutoConfig.from_pretrained(folder)
        files = tensor_files(folder)
        biases = {
            kind
            for name in files
            for kind, marker in (
                ("qkv", "q_proj.bias"),
                ("o", "o_proj.bias"),
                ("gate_up", "gate_proj.bias"),
                ("down", "down_proj.bias"),
            )
            if name.endswith(marker)
        }
        if torch.device(device).type == "cpu":  # before the matmul plan and cost probe time anything
            keep_freed_memory()
        model = cls(config, max_model_len, DTYPES[dtype], torch.device(device), biases, matmul)

        loaded = model.load_weights(read_tensors(folder), strict=True)
        missing = sorted(set(model._views) - loaded - {"lm_head.weight"})
        if missing:
            raise ValueError(f"checkpoint {folder} lacks {len(missing)} tensors, e.g. {missing[:3]}")
        if tune:
            model.tune()
        return model

    def _param_views(self) -> dict[str, torch.Tensor]:
        """transformers parameter name -> the slice of our fused storage that holds it."""
        s = self.shape
        q, kv, inter = s.q_size, s.kv_size, s.intermediate_size
        views = {
            "model.embed_tokens.weight": self.embed,
            "model.norm.weight": self.norm,
            "lm_head.weight": self.lm_head,
        }
        for i, w in enumerate(self.layers):
            p = f"model.layers.{i}."
            views.update(
                {
                    p + "input_layernorm.weight": w.ln1,
                    p + "post_attention_layernorm.weight": w.ln2,
                    p + "self_attn.q_proj.weight": w.wqkv[:q],
                    p + "self_attn.k_proj.weight": w.wqkv[q : q + kv],
                    p + "self_attn.v_proj.weight": w.wqkv[q + kv :],
                    p + "self_attn.o_proj.weight": w.wo,
                    p + "mlp.gate_proj.weight": w.w_gate_up[:inter],
                    p + "mlp.up_proj.weight": w.w_gate_up[inter:],
                    p + "mlp.down_proj.weight": w.w_down,
                }
            )
            if w.bqkv is not None:
                views[p + "self_attn.q_proj.bias"] = w.bqkv[:q]
                views[p + "self_attn.k_proj.bias"] = w.bqkv[q : q + kv]
                views[p + "self_attn.v_proj.bias"] = w.bqkv[q + kv :]
            if w.bo is not None:
                views[p + "self_attn.o_proj.bias"] = w.bo
            if w.b_gate_up is not None:
                views[p + "mlp.gate_proj.bias"] = w.b_gate_up[:inter]
                views[p + "mlp.up_proj.bias"] = w.b_gate_up[inter:]
            if w.b_down is not None:
                views[p + "mlp.down_proj.bias"] = w.b_down
            if w.q_norm is not None:
                views[p + "self_attn.q_norm.weight"] = w.q_norm
                views[p + "self_attn.k_norm.weight"] = w.k_norm
        return views

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self._views.items()}

    def check_weight(self, name: str, tensor: torch.Tensor) -> str | None:
        """The model's name for a transformers-named tensor, once its name, shape and dtype are checked; None for
        rotary buffers that some checkpoints carry (skipped). Raises ValueError/TypeError naming the parameter."""
        return check_named_tensor(name, tensor, self._views, self.shape.architecture)

    @torch.inference_mode()
    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """Copy transformers-named tensors into place; every name and shape is checked before anything is written.

        Returns the names loaded. Unknown names raise when strict (a trainer pushing weights of another model must
        not half-update this one); rotary buffers that some checkpoints carry are skipped.
        """
        staged: list[tuple[torch.Tensor, torch.Tensor]] = []
        loaded: set[str] = set()
        for name, tensor in named:
            if not strict and name.removeprefix("module.") not in self._views:
                continue
            key = self.check_weight(name, tensor)
            if key is not None:
                staged.append((self._views[key], tensor))
                loaded.add(key)
        for target, tensor in staged:
            target.copy_(tensor)
        if staged and self.plan.uses_onednn():
            self.plan.pack([w for g in self._matmul_groups() for w in g])  # the oneDNN copies are now stale
        return loaded

    def _matmul_groups(self) -> list[list[torch.Tensor]]:
        """Weights used in products, grouped by shape (one projection of every layer per group)."""
        layers = self.layers
        return [
            [self.lm_head],
            [w.wqkv for w in layers],
            [w.wo for w in layers],
            [w.w_gate_up for w in layers],
            [w.w_down for w in layers],
        ]

    def tune(self) -> None:
        """Lay the weights out for oneDNN and measure the fastest product per shape (cached per machine)."""
        groups = self._matmul_groups()
        self.plan.pack([w for g in groups for w in g])
        self.plan.tune(groups)

    # ------------------------------------------------------------------ forward

    def new_cache(self, num_slots: int) -> SlotKVCache:
        s = self.shape
        return SlotKVCache(
            s.num_layers, num_slots, s.num_kv_heads, self.max_model_len, s.head_dim, self.dtype, self.device
        )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: SlotKVCache) -> torch.Tensor:
        """Run the new tokens through the model; returns fp32 logits [R, vocab] for batch.logit_rows."""
        s = self.shape
        mm = self.plan.mm
        h = self.embed[batch.token_ids]  # [M, D]
        cos = self.cos[batch.positions].unsqueeze(1)  # [M, 1, hd]
        sin = self.sin[batch.positions].unsqueeze(1)  # [M, 1, hd]
        for layer, w in enumerate(self.layers):
            h = decoder_layer(h, w, s, cos, sin, self._attend(layer, batch, cache), mm)  # [M, D]
        x = rms_norm(h[batch.logit_rows], self.norm, s.rms_norm_eps)  # [R, D]
        return mm(self.lm_head, x).float()  # [R, V]

    def _attend(self, layer: int, batch: ForwardBatch, cache: SlotKVCache):
        """The layer's attention for decoder_layer: the new keys and values into the slot cache, then q over it."""

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.write(layer, batch.write_slots, batch.write_pos, k, v)
            return self._attention(q, layer, batch, cache)  # [M, H * hd]

        return attend

    def _attention(self, q: torch.Tensor, layer: int, batch: ForwardBatch, cache: SlotKVCache) -> torch.Tensor:
        """q [M, H, hd] -> attention output [M, H * hd] over the cache (which already holds the new keys)."""
        s = self.shape
        b, t, m = batch.num_seqs, batch.max_new, batch.num_tokens
        keys, values = cache.view(layer, batch.slot_lo, batch.slot_lo + b, batch.ctx)  # [B, KVH, ctx, hd]
        scale = s.head_dim**-0.5
        if batch.is_decode:
            out = F.scaled_dot_product_attention(
                q.unsqueeze(2), keys, values, attn_mask=batch.attn_mask, scale=scale, enable_gqa=True
            )  # [B, H, 1, hd]
            return out.reshape(m, s.q_size)  # [M, H * hd]
        if batch.split is not None:
            return self._split_attention(q, keys, values, batch)
        q_pad = q.new_zeros(b * t, s.num_heads, s.head_dim)
        q_pad[batch.padded_index] = q
        q_pad = q_pad.view(b, t, s.num_heads, s.head_dim).transpose(1, 2)  # [B, H, T, hd]
        out = F.scaled_dot_product_attention(
            q_pad, keys, values, attn_mask=batch.attn_mask, scale=scale, enable_gqa=True
        )  # [B, H, T, hd]
        out = out.transpose(1, 2).reshape(b * t, s.q_size)  # [B * T, H * hd]
        return out[batch.padded_index]  # [M, H * hd]

    def _split_attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """Attention for a batch whose sequences bring different numbers of tokens (see batch.RaggedSplit)."""
        s, sp = self.shape, batch.split
        scale = s.head_dim**-0.5
        out = q.new_empty(batch.num_tokens, s.q_size)  # [M, H * hd]
        first = F.scaled_dot_product_attention(
            q[sp.first_rows].unsqueeze(2), keys, values, attn_mask=sp.first_mask, scale=scale, enable_gqa=True
        )  # [B, H, 1, hd]
        out[sp.first_rows] = first.reshape(batch.num_seqs, s.q_size)
        for g in sp.groups:
            d, w = len(g.seqs), g.width
            keys_g = keys.index_select(0, g.seqs)[:, :, : g.ctx]  # [D, KVH, ctx_g, hd]
            values_g = values.index_select(0, g.seqs)[:, :, : g.ctx]  # [D, KVH, ctx_g, hd]
            q_pad = q.new_zeros(d * w, s.num_heads, s.head_dim)
            q_pad[g.padded_index] = q[g.rows]
            q_pad = q_pad.view(d, w, s.num_heads, s.head_dim).transpose(1, 2)  # [D, H, W, hd]
            rest = F.scaled_dot_product_attention(
                q_pad, keys_g, values_g, attn_mask=g.mask, scale=scale, enable_gqa=True
            )  # [D, H, W, hd]
            out[g.rows] = rest.transpose(1, 2).reshape(d * w, s.q_size)[g.padded_index]
        return out
