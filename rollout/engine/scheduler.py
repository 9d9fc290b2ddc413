"""Admission and release of KV slots, with prompts shared between a prompt's samples.

Running sequences hold the slots [0, n) in order: running[i] occupies slot i. Admission appends to that block,
release fills the holes it leaves by moving the last sequences down (one KV copy each), so the block stays
contiguous and a forward's sequences are always a slice of the cache.

With share_prompts, a request whose prompt a running sequence already holds copies that prompt's keys/values from
its slot and starts decoding at once (GRPO samples every prompt G times: only the first copy pays for the prefill);
one whose prompt is first being prefilled in this very step waits one step for that copy to exist, and requests
behind it go ahead. A finished sequence's prompt is kept past its slot while a queued sibling still needs it.
"""

from __future__ import annotations

import torch

from rollout.engine.kv_cache import SlotKVCache
from rollout.engine.sequence import Sequence

# a prompt's keys/values kept past its slot: (prompt, keys, values)
KeptPrompt = tuple[list[int], torch.Tensor, torch.Tensor]


class Scheduler:
    def __init__(self, cache: SlotKVCache, max_num_seqs: int, share_prompts: bool):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.share_prompts = share_prompts
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # running[i] occupies KV slot i
        self.kept_prompts: dict[str, KeptPrompt] = {}

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def batches(self) -> list[tuple[list[Sequence], int]]:
        """This step's forwards as (sequences, first slot): those already decoding, then those admitted this step
        (a prompt's rows beside one-token decodes would make every decode pay for the prompt's attention)."""
        prefilled = sum(1 for s in self.running if s.cache_len > 0)
        out = []
        if prefilled:
            out.append((self.running[:prefilled], 0))
        if prefilled < len(self.running):
            out.append((self.running[prefilled:], prefilled))
        return out

    def admit(self) -> list[Sequence]:
        """Move waiting requests into free slots; returns the sequences admitted."""
        sources: dict[str, int | KeptPrompt] = dict(self.kept_prompts)  # prompt key -> slot or kept copy
        if self.share_prompts:
            sources.update({s.prompt_key: slot for slot, s in enumerate(self.running) if s.cache_len > 0})
        prefilling: set[str] = set()
        shared: list[tuple[Sequence, int | KeptPrompt]] = []  # (sequence, where it copies its prompt from)
        fresh: list[Sequence] = []
        deferred: list[Sequence] = []
        queue, self.waiting = self.waiting, []
        for i, s in enumerate(queue):
            if len(self.running) + len(shared) + len(fresh) >= self.max_num_seqs:
                self.waiting = queue[i:]
                break
            source = sources.get(s.prompt_key) if len(s.prompt) > 1 else None
            held = self.running[source].prompt if isinstance(source, int) else source[0] if source else None
            if held == s.prompt:
                shared.append((s, source))
            elif self.share_prompts and s.prompt_key in prefilling:
                deferred.append(s)
            else:
                prefilling.add(s.prompt_key)
                fresh.append(s)
        self.waiting = deferred + self.waiting
        # Slots [0, n) hold sequences with a cache, the new prefills come after them (batches() runs them apart).
        admitted = len(self.running)
        for s, src in shared:
            if isinstance(src, int):
                self.cache.move_slot(src, len(self.running), len(s.prompt) - 1)
            else:
                self.cache.load_prefix(len(self.running), src[1], src[2])
            s.cache_len = len(s.prompt) - 1  # the last prompt token is fed at this step, like a sampled token
            self.running.append(s)
        self.running += fresh
        if self.kept_prompts:
            queued = {s.prompt_key for s in self.waiting}
            self.kept_prompts = {k: v for k, v in self.kept_prompts.items() if k in queued}
        return self.running[admitted:]

    def remove_waiting(self, request_id: str) -> Sequence | None:
        for i, s in enumerate(self.waiting):
            if s.request_id == request_id:
                return self.waiting.pop(i)
        return None

    def find_running(self, request_id: str) -> Sequence | None:
        return next((s for s in self.running if s.request_id == request_id), None)

    def release(self, finished: list[Sequence]) -> None:
        """Free the slots of finished sequences, keeping the running ones in a contiguous block [0, n)."""
        if not finished:
            return
        done = {id(s) for s in finished}
        keep = [s for s in self.running if id(s) not in done]
        if self.share_prompts and self.waiting:
            # A queued sibling would otherwise prefill this prompt again: keep its keys/values past the slot.
            queued = {s.prompt_key for s in self.waiting} - {s.prompt_key for s in keep} - set(self.kept_prompts)
            for slot, s in enumerate(self.running):
                # At most a cache's worth of slots is kept (beyond that, prefilling again is the cheaper memory).
                room = len(self.kept_prompts) < self.max_num_seqs
                if room and id(s) in done and s.prompt_key in queued and s.cache_len >= len(s.prompt) - 1 > 0:
                    self.kept_prompts[s.prompt_key] = (s.prompt, *self.cache.copy_prefix(slot, len(s.prompt) - 1))
                    queued.discard(s.prompt_key)
        # Fill each hole left of the new end with the last running sequence beyond it (one KV copy each).
        new_running: list[Sequence | None] = [s if id(s) not in done else None for s in self.running[: len(keep)]]
        movers = [(slot, s) for slot, s in enumerate(self.running) if slot >= len(keep) and id(s) not in done]
        holes = [slot for slot, s in enumerate(new_running) if s is None]
        for hole, (src, s) in zip(holes, movers):
            self.cache.move_slot(src, hole, s.cache_len)
            new_running[hole] = s
        self.running = [s for s in new_running if s is not None]
        assert len(self.running) == len(keep)

    def clear_kept(self) -> None:
        """Kept keys/values are the old weights' once new weights load."""
        self.kept_prompts.clear()
