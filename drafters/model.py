"""A parametric drafter: the target's first layers, frozen, under one decoder block trained on the policy's rollouts.

Why this shape. Retrieval (drafters/suffix.py) stalls where the policy writes text that no sibling and no earlier
rollout has written; a small network that models the policy generalises there. Training a separate small LM from
scratch on CPU within a refresh is hopeless, so the drafter borrows the target (as Kangaroo does): its embeddings
and first `layers` decoder layers stay frozen, one more decoder block on top (initialised as the target's next
layer) is trained, and the target's own final norm and lm_head read the result out. At initialisation the drafter
is the target cut after `layers + 1` layers; each refresh distils the policy's current behaviour into the top block.

Distillation from the policy's own distributions. The drafter asks the engine (`top_logprobs`) to record, for every
generated token, the target's `top_logprobs` most likely tokens and their logprobs under the request's processed
distribution; they come out of the forwards that generated the rollout, so the teacher costs no extra target
compute and is always the policy at that version. The loss is the cross-entropy to that distribution (renormalised
over the kept tokens): a sampled token is one draw from it, the top-16 carry the policy's whole ranking, and at
T=1.0 a block trained on them learns what the next sibling is likely to write rather than what one rollout did
(replay of the committed T=1.0 trace: `model` 1.53 -> 1.58 acceptance length, 1.65 with the leaves below).
Rollouts without them (a history recorded for another drafter, older traces) fall back to the sampled token as a
one-hot target. Hidden states of the frozen part depend only on the tokens, so they are computed once per rollout
(no grad) and cached; a refresh trains only the top block on them, newest versions weighted most, until
`train_seconds` run out. Each refresh that trains bumps `weights_version` (the policy version it learned).

Speed. The output head keeps only the `vocab_size` tokens seen most often in the window's prompts and rollouts
(the policy writes from a small vocabulary in any one task; a token outside it just cannot be drafted). Drafting
runs one batched forward for all requests per draft position (`propose_batch`), over a KV cache with one row per
request; rows are compacted when a request ends so the active rows are always a prefix and need no gather.

The draft is a chain, the drafter's argmax at each depth with its probability as the estimate that the node is
accepted, cut where the path probability falls below `min_prob`, plus the runner-up tokens at each depth as leaves
beside the chain node (`leaves`), the best max_tokens nodes by path probability kept. drafters/composite.py merges
it with the suffix drafter's tree.

What it reuses. Its layers are the target's by construction: each Block runs rollout/layers.py's `decoder_layer`, the
very function of the embedded engine's forward, on fp32 copies of the checkpoint's weights (as nn.Parameters, so
the top block trains through it with autograd), with only the attention over its own KV rows written here; the
checkpoint is read by rollout/checkpoint_io.py, the engine's reader. Neither module is part of rollout/engine/.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from drafters.base import EMPTY_DRAFT, BaseDrafter, Draft, register_drafter
from drafters.composite import merge_drafts
from drafters.options import DrafterOptions, build_options
from rollout.checkpoint_io import read_tensors, safetensors_files
from rollout.layers import (
    LayerWeights,
    ModelShape,
    decoder_layer,
    layer_weights,
    rms_norm,
    rope_tables,
    shape_from_config,
)


@dataclass
class ModelDrafterConfig(DrafterOptions):
    drafter: ClassVar[str] = "model"

    model: str | None = None  # the target's checkpoint (its first layers are reused); None: the engine's target,
    # or the embedded SmolLM2 where there is no engine (offline replay)
    layers: int = 4  # frozen target layers under the trained block
    vocab_size: int = 4096  # tokens the head can propose: the most frequent in the window
    train_seconds: float = 30.0  # time budget of one refresh's training
    max_epochs: int = 8  # ... and at most this many passes over the window
    lr: float = 2e-3
    batch_sequences: int = 16
    decay: float = 0.5  # sampling weight of a rollout one policy version old, relative to the newest
    window_versions: int = 4  # rollouts of this many recent versions are trained on
    min_prob: float = 0.05  # stop drafting where the drafter's path probability falls below this
    top_logprobs: int = 16  # the target's top-k per generated token to distil from (0: the sampled tokens only)
    leaves: int = 3  # the drafter's runner-up tokens at each depth, proposed as leaves beside its chain
    draft_untrained: bool = False  # before its first training the cut target rarely guesses right: propose nothing
    max_requests: int = 512  # KV rows: requests drafted at once (allocated as needed)
    max_len: int = 4096  # prompt + output tokens per request (allocated as needed)
    seed: int = 0

    def validate(self) -> None:
        for name in ("top_logprobs", "leaves"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"model drafter {name} must be an int >= 0, got {value!r}")


class Block(nn.Module):
    """One decoder layer of the target, its weights copied into fp32 parameters; the math is the engine's
    (rollout/layers.py: decoder_layer), with attention over this drafter's own [batch, time] rows and K/V."""

    def __init__(self, shape: ModelShape, tensors: dict[str, torch.Tensor], prefix: str):
        super().__init__()
        self.shape = shape
        fused = layer_weights(tensors, prefix, shape)
        params = {name: nn.Parameter(t.detach().clone().float()) for name, t in fused.tensors().items()}
        for name, param in params.items():
            self.register_parameter(name, param)
        # the same Parameters: the optimizer updates them in place, decoder_layer reads them
        self.weights: LayerWeights = dataclasses.replace(fused, **params)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, H]
        cos: torch.Tensor,  # [B, T, hd]
        sin: torch.Tensor,  # [B, T, hd]
        mask: torch.Tensor | None,  # [B, 1, T, L] bool (True = attend); None = causal over T
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,  # K, V [B, KVH, max_len, hd], written in place
        positions: torch.Tensor | None = None,  # [B, T] where this forward's tokens go in the cache
        keys: int = 0,  # cache positions [0, keys) attended to
    ) -> torch.Tensor:
        s = self.shape
        B, T, _ = x.shape

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
            if cache is not None:
                index = positions[:, None, :, None].expand(B, s.num_kv_heads, T, s.head_dim)
                cache[0].scatter_(2, index, k)
                cache[1].scatter_(2, index, v)
                k, v = cache[0][:, :, :keys], cache[1][:, :, :keys]  # [B, KVH, keys, hd]
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            return a.transpose(1, 2).reshape(B, T, -1)  # [B, T, NH * hd]

        return decoder_layer(x, self.weights, s, cos.unsqueeze(-2), sin.unsqueeze(-2), attend)


class DraftNet(nn.Module):
    """Frozen: embeddings, layers [0, n). Trained: the block on top. Frozen: final norm and (a slice of) lm_head."""

    def __init__(self, folder: Path, layers: int, max_len: int):
        super().__init__()
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(folder)
        s = self.shape = shape_from_config(hf, getattr(hf, "max_position_embeddings", 2048))
        if not 1 <= layers < s.num_layers:
            raise ValueError(f"model drafter layers must be in [1, {s.num_layers - 1}] for this target, got {layers}")
        prefixes = [f"model.layers.{i}." for i in range(layers + 1)]
        if not safetensors_files(folder):
            raise FileNotFoundError(f"no *.safetensors in {folder}: the model drafter reads the target's checkpoint")
        tensors = dict(
            read_tensors(
                folder,
                lambda n: (
                    n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
                    or any(n.startswith(p) for p in prefixes)
                ),
            )
        )
        self.embed = tensors["model.embed_tokens.weight"].float()  # [V, H]
        self.lm_head = tensors.get("lm_head.weight", self.embed).float()  # [V, H]; tied in SmolLM2
        self.norm = tensors["model.norm.weight"].float()  # [H]
        self.frozen = nn.ModuleList(Block(s, tensors, p) for p in prefixes[:-1]).requires_grad_(False)
        self.top = Block(s, tensors, prefixes[-1])
        self.cos, self.sin = rope_tables(hf, s, max_len)  # [max_len, hd]
        self.max_len = max_len

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]  # [B, T, hd] each

    @torch.no_grad()
    def frozen_states(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states after the frozen layers for whole sequences, causal: ids [B, T] -> [B, T, H]."""
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        cos, sin = self.rope(positions)
        x = self.embed[ids]
        for block in self.frozen:
            x = block(x, cos, sin, None)
        return x

    def logits(self, x: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., len(vocab)] over the kept vocabulary."""
        return F.linear(rms_norm(x, self.norm, self.shape.rms_norm_eps), self.lm_head[vocab])


class _KVRows:
    """KV cache rows for the drafter's layers: K, V [layers, rows, KVH, length, hd]; rows [0, n) are in use.

    Both dimensions grow by doubling as requests and contexts need them, up to the configured maxima: a drafter
    sized for 256 requests of 2048 tokens up front would hold gigabytes it rarely uses."""

    def __init__(self, net: DraftNet, max_rows: int, max_len: int):
        s = net.shape
        self.max_rows, self.max_len = max_rows, max_len
        self.k = torch.zeros(len(net.frozen) + 1, 0, s.num_kv_heads, 0, s.head_dim)
        self.v = self.k.clone()

    def ensure(self, rows: int, length: int) -> None:
        have_rows, have_len = self.k.shape[1], self.k.shape[3]
        if rows <= have_rows and length <= have_len:
            return
        new_rows = min(self.max_rows, max(rows, 2 * have_rows, 16))
        new_len = min(self.max_len, max(length, 2 * have_len, 256))
        L, _, kvh, _, hd = self.k.shape
        for name in ("k", "v"):
            old = getattr(self, name)
            grown = torch.zeros(L, new_rows, kvh, new_len, hd)
            grown[:, :have_rows, :, :have_len] = old
            setattr(self, name, grown)

    def move(self, src: int, dst: int, length: int) -> None:
        if length == 0:  # nothing cached yet (the row may not even be allocated)
            return
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


@dataclass
class _Rollout:
    """One rollout ready to train on: its frozen states and, per output token, the distribution to learn."""

    ids: torch.Tensor  # [T] prompt + output tokens
    states: torch.Tensor  # [T, H] after the frozen layers
    n_prompt: int
    target_ids: torch.Tensor  # [T - n_prompt, K] candidate next tokens at each output position
    target_probs: torch.Tensor  # [T - n_prompt, K] their probabilities (K = 1, prob 1: the sampled token)


def _targets(output: torch.Tensor, top_ids, top_logprobs, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output position: the target's top-k (ids, probs) where recorded and wanted, else the sampled token."""
    n = len(output)
    if k and top_ids is not None and top_logprobs is not None and len(top_ids) >= n and all(top_ids[:n]):
        width = min(k, max(len(row) for row in top_ids[:n]))
        ids = torch.zeros(n, width, dtype=torch.long)  # [n, K]
        probs = torch.zeros(n, width)  # a position with fewer than K recorded keeps zeros past them
        for i, (row_ids, row_lps) in enumerate(zip(top_ids[:n], top_logprobs[:n])):
            m = min(width, len(row_ids))
            ids[i, :m] = torch.tensor(row_ids[:m], dtype=torch.long)
            probs[i, :m] = torch.tensor(row_lps[:m], dtype=torch.float32).exp()
        return ids, probs
    return output[:, None], torch.ones(n, 1)


@dataclass
class _Request:
    row: int
    cached: int = 0  # tokens whose K/V are in the cache
    pending: list[int] | None = None  # tokens observed but not yet fed through the drafter


@register_drafter("model")
class ModelDrafter(BaseDrafter):
    def __init__(self, **options):
        self.config = build_options(ModelDrafterConfig, options)
        self.net: DraftNet | None = None  # built from config.model, or from the engine's target (bind_target)
        if self.config.model is not None:
            self._build(self.config.model)
        self.requests: dict[str, _Request] = {}
        self.order: list[str] = []  # order[row] = the request in that row
        self.weights_version = -1  # policy version the top block was last trained on (-1: never)
        self.train_log: list[dict] = []
        self._states: dict[int, list[_Rollout]] = {}  # policy version -> its rollouts, encoded
        self._rng = random.Random(self.config.seed)

    @property
    def top_logprobs(self) -> int:
        return self.config.top_logprobs

    def _build(self, model: str) -> None:
        from rollout.checkpoint import resolve_model

        c = self.config
        self.net = DraftNet(Path(resolve_model(model)), c.layers, c.max_len)
        self.kv = _KVRows(self.net, c.max_requests, c.max_len)
        # Until the first refresh sees rollouts, propose over the whole vocabulary.
        self.vocab = torch.arange(self.net.shape.vocab_size)  # [Vk] token id of each head row
        self.optimizer = torch.optim.Adam(self.net.top.parameters(), lr=c.lr)

    def bind_target(self, folder: str) -> None:
        """The engine's target checkpoint: the drafter builds on it unless its config named a model."""
        if self.net is None:
            self._build(folder)

    def _ensure_built(self) -> DraftNet:
        if self.net is None:  # used without an engine (replay, tests): the embedded default target
            self._build("smollm2-135m")
        return self.net

    # ------------------------------------------------------------------ lifecycle

    def begin(self, request_id, prompt_ids, group):
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} began twice")
        if len(self.order) == self.config.max_requests:
            raise RuntimeError(f"model drafter holds {len(self.order)} requests; raise max_requests")
        self.requests[request_id] = _Request(row=len(self.order), pending=list(prompt_ids))
        self.order.append(request_id)

    def observe(self, request_id, token_ids, logprobs=None):
        self.requests[request_id].pending.extend(int(t) for t in token_ids)

    def end(self, request_id):
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        last = self.order.pop()
        if last != request_id:  # keep the rows in use a prefix: the last row moves into the freed one
            moved = self.requests[last]
            if self.net is not None:
                self.kv.move(moved.row, req.row, moved.cached)
            moved.row = req.row
            self.order[req.row] = last

    def propose(self, request_id: str, max_tokens: int) -> Draft:
        return self.propose_batch([request_id], [max_tokens])[0]

    # ------------------------------------------------------------------ drafting

    @torch.no_grad()
    def propose_batch(self, request_ids: Sequence[str], max_tokens: Sequence[int]) -> list[Draft]:
        c = self.config
        if self.weights_version < 0 and not c.draft_untrained:
            return [EMPTY_DRAFT] * len(request_ids)
        self._ensure_built()
        want = {rid: k for rid, k in zip(request_ids, max_tokens) if k > 0}
        if not want:
            return [EMPTY_DRAFT] * len(request_ids)
        for rid in want:
            req = self.requests[rid]
            if req.cached + len(req.pending) + want[rid] > c.max_len:
                want[rid] = max(0, c.max_len - req.cached - len(req.pending))
        logits = self._feed_pending()  # [n, Vk] at each row's last fed token (or None rows)
        n = len(self.order)
        rows = torch.tensor([self.requests[r].row for r in want], dtype=torch.long)
        limits = torch.tensor(list(want.values()))
        depth_cap = int(limits.max())
        tokens = torch.zeros(n, depth_cap, dtype=torch.long)
        probs = torch.zeros(n, depth_cap)
        path = torch.ones(n)
        alive = torch.zeros(n, dtype=torch.bool)
        alive[rows] = True
        length = torch.zeros(n, dtype=torch.long)
        cap = torch.zeros(n, dtype=torch.long)
        cap[rows] = limits
        start = torch.tensor([self.requests[r].cached for r in self.order])  # draft positions begin here
        leaves = min(c.leaves, len(self.vocab) - 1)
        alt_tokens = torch.zeros(n, depth_cap, leaves, dtype=torch.long)  # runner-ups beside chain node d
        alt_path = torch.zeros(n, depth_cap, leaves)  # their path probabilities (0: not proposed)
        for d in range(depth_cap):
            top_p, top_idx = logits.softmax(-1).topk(1 + leaves, dim=-1)  # [n, 1 + leaves]
            p, idx = top_p[:, 0], top_idx[:, 0]  # [n]
            alt_tokens[:, d] = self.vocab[top_idx[:, 1:]]
            alt_path[:, d] = torch.where(alive[:, None] & (d < cap)[:, None], path[:, None] * top_p[:, 1:], 0.0)
            path = path * p
            alive &= (path >= c.min_prob) & (d < cap)
            if not alive.any():
                break
            tokens[:, d] = self.vocab[idx]
            probs[:, d] = p
            length[alive] = d + 1
            if d + 1 == depth_cap or not (alive & (d + 1 < cap)).any():
                break
            # Every row is fed (rows not drafting just compute a token nobody reads): the rows stay a prefix.
            logits = self._forward(tokens[:, d : d + 1], start + d, torch.ones(n, dtype=torch.long))
        out = []
        for rid in request_ids:
            if rid not in want:
                out.append(EMPTY_DRAFT)
                continue
            row = self.requests[rid].row
            k = int(length[row])
            chain = Draft(tokens[row, :k].tolist(), None, probs[row, :k].tolist()) if k else EMPTY_DRAFT
            out.append(self._with_leaves(chain, alt_tokens[row], alt_path[row], want[rid]))
        return out

    def _with_leaves(self, chain: Draft, alt_tokens: torch.Tensor, alt_path: torch.Tensor, max_tokens: int) -> Draft:
        """The chain plus the runner-up tokens at each depth as leaves beside it (children of the chain node
        before), the best max_tokens nodes by path probability. alt_tokens, alt_path: [depth, leaves].

        Why: at T=1.0 the policy's second choice is often nearly as likely as its first, and a leaf costs the
        target one more row, no drafter forward. Replay of the committed T=1.0 trace: `composite` 1.99 -> 2.04
        (with the distilled drafter; +1.3% when it learned from sampled tokens only)."""
        if not self.config.leaves:
            return chain
        tokens, parents, path = list(chain.token_ids), list(chain.parent_list()), chain.path_probs()
        for d, (alts, alt_p) in enumerate(zip(alt_tokens.tolist(), alt_path.tolist())):
            for t, pp in zip(alts, alt_p):
                if pp >= self.config.min_prob:
                    tokens.append(t)
                    parents.append(d - 1)  # the chain node before depth d (-1: the root)
                    path.append(pp)
        if len(tokens) == len(chain):
            return chain
        cond = [pp / (path[q] if q >= 0 else 1.0) for pp, q in zip(path, parents)]
        return merge_drafts([Draft(tokens, parents, cond)], max_tokens)

    def _feed_pending(self) -> torch.Tensor:
        """Run every row's observed tokens through the drafter; logits [n, Vk] after each row's last token."""
        n = len(self.order)
        reqs = [self.requests[r] for r in self.order]
        counts = torch.tensor([len(r.pending) for r in reqs])
        if int(counts.max()) == 0:
            raise RuntimeError("model drafter asked to propose before observing any token")
        width = int(counts.max())
        tokens = torch.zeros(n, width, dtype=torch.long)
        for i, r in enumerate(reqs):
            tokens[i, : len(r.pending)] = torch.tensor(r.pending, dtype=torch.long)
        start = torch.tensor([r.cached for r in reqs])
        logits = self._forward(tokens, start, counts)
        for r in reqs:
            r.cached += len(r.pending)
            r.pending = []
        return logits

    def _forward(self, tokens: torch.Tensor, start: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """tokens [n, T] (row i: counts[i] real tokens, then padding) at cache positions start[i].. -> logits [n, Vk].

        Padding is written to the cache past each row's real tokens, where the next real tokens overwrite it; no
        real query attends that far (keys are allowed up to the query's own position).
        """
        n, T = tokens.shape
        net = self.net
        positions = (start[:, None] + torch.arange(T)).clamp(max=self.config.max_len - 1)  # [n, T]
        keys = int(positions.max()) + 1
        self.kv.ensure(n, keys)
        mask = torch.arange(keys)[None, None, :] <= positions[:, :, None]  # [n, T, keys]
        cos, sin = net.rope(positions)
        x = net.embed[tokens]  # [n, T, H]
        for layer, block in enumerate([*net.frozen, net.top]):
            cache = (self.kv.k[layer, :n], self.kv.v[layer, :n])
            x = block(x, cos, sin, mask[:, None], cache, positions, keys)
        last = (counts - 1).clamp(min=0)
        return net.logits(x[torch.arange(n), last], self.vocab)  # [n, Vk]

    # ------------------------------------------------------------------ learning

    def refresh(self, history, policy_version: int) -> None:
        """Cache frozen states of new rollouts, pick the vocabulary, train the top block within the time budget."""
        if history is None:
            return
        self._ensure_built()
        table = history.table()
        if table.num_rows == 0:
            return
        cols = table.select(["policy_version", "prompt_ids", "token_ids", "top_token_ids", "top_logprobs"])
        cols = cols.to_pydict()
        c = self.config
        keep = {v for v in set(cols["policy_version"]) if v > policy_version - 1 - c.window_versions}
        for v in list(self._states):
            if v not in keep:
                del self._states[v]
        new = sorted(v for v in keep if v not in self._states)
        for v in new:
            rows = zip(*cols.values())  # (version, prompt, output, top ids, top logprobs)
            self._states[v] = self._encode([row[1:] for row in rows if row[0] == v and row[2]])
        if not any(self._states.values()):
            return
        self._choose_vocab()
        self._train(max(self._states))
        self.weights_version = policy_version

    def _encode(self, rows) -> list[_Rollout]:
        """(prompt ids, output ids, top ids or None, top logprobs or None) per rollout -> encoded rollouts."""
        out = []
        max_len = self.config.max_len
        for prompt, output, top_ids, top_logprobs in rows:
            if len(prompt) >= max_len:
                continue  # no output token fits the drafter's context
            ids = torch.tensor((list(prompt) + list(output))[:max_len], dtype=torch.long)
            n_prompt = len(prompt)
            target_ids, target_probs = _targets(ids[n_prompt:], top_ids, top_logprobs, self.config.top_logprobs)
            states = self.net.frozen_states(ids[None])[0]  # [T, H]
            out.append(_Rollout(ids, states, n_prompt, target_ids, target_probs))
        return out

    def _choose_vocab(self) -> None:
        counts = torch.zeros(self.net.shape.vocab_size)
        for items in self._states.values():
            for r in items:
                counts += torch.bincount(r.ids, minlength=len(counts)).float()
                counts += 3.0 * torch.bincount(r.ids[r.n_prompt :], minlength=len(counts)).float()  # outputs more
                # the policy's likeliest alternatives at each position, which a sibling may well write
                counts += torch.bincount(r.target_ids[:, :4].reshape(-1), minlength=len(counts)).float()
        k = min(self.config.vocab_size, int((counts > 0).sum()))
        self.vocab = counts.topk(k).indices.sort().values  # [Vk]

    def _train(self, newest: int) -> None:
        c = self.config
        items = [(it, c.decay ** (newest - v)) for v, its in self._states.items() for it in its]
        position = torch.full((self.net.shape.vocab_size,), -1, dtype=torch.long)
        position[self.vocab] = torch.arange(len(self.vocab))  # token id -> head row (-1: not in the head)
        t0, steps, losses = time.perf_counter(), 0, []
        budget_steps = c.max_epochs * math.ceil(len(items) / c.batch_sequences)
        weights = [w for _, w in items]
        while steps < budget_steps and time.perf_counter() - t0 < c.train_seconds:
            batch = self._rng.choices(range(len(items)), weights=weights, k=min(c.batch_sequences, len(items)))
            loss = self._loss([items[i][0] for i in batch], position)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
            steps += 1
        self.train_log.append(
            {
                "version": newest,
                "steps": steps,
                "seconds": round(time.perf_counter() - t0, 2),
                "loss_first": round(losses[0], 4) if losses else None,
                "loss_last": round(sum(losses[-4:]) / len(losses[-4:]), 4) if losses else None,
            }
        )

    def _loss(self, batch: list[_Rollout], position: torch.Tensor) -> torch.Tensor:
        """Cross-entropy to the policy's distribution at each output position (over the tokens of it the head
        keeps, renormalised), given the frozen states before it."""
        T = max(len(r.ids) for r in batch)
        K = max(r.target_ids.shape[1] for r in batch)
        x = torch.zeros(len(batch), T, self.net.shape.hidden_size)  # right-padded: causal attention ignores it
        target = torch.full((len(batch), T, K), -1, dtype=torch.long)  # head row of each candidate (-1: none)
        weight = torch.zeros(len(batch), T, K)
        for i, r in enumerate(batch):
            x[i, : len(r.ids)] = r.states
            # position t predicts token t + 1; only output tokens are what the policy chose
            out = slice(r.n_prompt - 1, len(r.ids) - 1)
            k = r.target_ids.shape[1]
            target[i, out, :k] = position[r.target_ids]
            weight[i, out, :k] = r.target_probs
        positions = torch.arange(T).expand(len(batch), T)
        cos, sin = self.net.rope(positions)
        h = self.net.top(x, cos, sin, None)
        weight = torch.where(target >= 0, weight, 0.0)
        sel = weight.sum(-1) > 0  # positions with some of the policy's mass inside the head's vocabulary
        logq = self.net.logits(h[sel], self.vocab).log_softmax(-1)  # [N, Vk]
        p = weight[sel] / weight[sel].sum(-1, keepdim=True)  # [N, K]
        return -(p * logq.gather(1, target[sel].clamp(min=0))).sum(-1).mean()
