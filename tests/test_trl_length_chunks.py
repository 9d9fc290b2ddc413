"""The length-chunked GRPO loss (adapters/trl_length_chunks.py) is TRL's own loss: same value, same gradient.

Real TRL GRPOTrainer on SmolLM2, with a long-tailed batch built by hand (left-padded prompts, right-padded
completions of very different lengths); the reference is TRL's own compute_loss on the whole padded batch.
"""

from __future__ import annotations

import pytest
import torch

from adapters.trl_length_chunks import length_chunked, length_chunks


def tailed_batch(b: int = 12, p: int = 10, c: int = 40, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(3, p + 1, (b,), generator=g)
    completion_len = torch.randint(1, 8, (b,), generator=g)
    completion_len[:3] = torch.tensor([c, c - 5, 30])  # the tail
    prompt_mask = (torch.arange(p)[None] >= p - prompt_len[:, None]).long()  # left padding
    completion_mask = (torch.arange(c)[None] < completion_len[:, None]).long()  # right padding
    prompt_ids = torch.randint(10, 5000, (b, p), generator=g) * prompt_mask
    completion_ids = torch.randint(10, 5000, (b, c), generator=g) * completion_mask
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(b, generator=g),
        "num_items_in_batch": completion_mask.sum(),
    }


def test_chunks_keep_every_real_token_and_drop_padding():
    batch = tailed_batch()
    chunks = length_chunks(batch, 4)
    assert sum(len(ch["advantages"]) for ch in chunks) == 12
    assert sum(int(ch["completion_mask"].sum()) for ch in chunks) == int(batch["completion_mask"].sum())
    assert sum(int(ch["prompt_mask"].sum()) for ch in chunks) == int(batch["prompt_mask"].sum())
    positions = sum(ch["completion_mask"].numel() for ch in chunks)
    assert positions < batch["completion_mask"].numel() / 2, "most of the padded batch was padding"
    for ch in chunks:
        assert ch["completion_mask"][:, -1].any() and ch["prompt_mask"][:, 0].any(), "no all-padding column left"
        assert torch.equal(ch["num_items_in_batch"], batch["num_items_in_batch"])
    assert length_chunks({**batch, "pixel_values": torch.zeros(1)}, 4) is None, "unknown inputs are not cut"


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_chunked_loss_and_gradient_equal_trl_on_the_padded_batch(smol_folder, smol_tokenizer, tmp_path, loss_type):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(smol_folder, dtype=torch.float32)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=12,
        num_generations=4,
        beta=0.0,
        loss_type=loss_type,
        report_to=[],
        save_strategy="no",
    )
    dataset = Dataset.from_list([{"prompt": "x"}] * 12)
    chunked = length_chunked(GRPOTrainer, chunk_size=4)(
        model=model,
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=args,
        train_dataset=dataset,
        processing_class=smol_tokenizer,
    )
    chunked.current_gradient_accumulation_steps = 1  # set by the training loop, which this test does not run
    model.train()
    batch = tailed_batch()

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref_loss, ref_grads = loss_and_grads(lambda m, x: GRPOTrainer.compute_loss(chunked, m, x))
    got_loss, got_grads = loss_and_grads(chunked.compute_loss)
    assert torch.allclose(got_loss, ref_loss, rtol=1e-4, atol=1e-6), (got_loss, ref_loss)
    worst = max(((g - r).abs().max() / r.abs().max().clamp(min=1e-12)).item() for g, r in zip(got_grads, ref_grads))
    if loss_type == "dapo":
        assert worst < 1e-3, f"chunked gradient differs from TRL's by {worst:.2e} (relative to each tensor's max)"
    else:  # per-sequence means over the batch are not split into chunks: TRL's own loss runs, exactly
        assert torch.equal(got_loss, ref_loss) and worst == 0.0
