"""Processed distributions against transformers' own logits warpers, and SamplingParams validation.

The `exactness` tests process logits on SPECROLLOUT_TEST_DEVICE (conftest.py), transformers' warpers on the same
device: the two implementations are compared, not two devices' reduction orders.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from rollout.sampling import SamplingParams, process_logits


@pytest.mark.exactness
@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.9), (0.6, 50, 0.95), (1.3, 1, 1.0), (0.9, 0, 0.3)],
)
def test_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 1000, generator=g) * 3).to(DEVICE)  # [R, V]
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(torch.zeros(64, 1, dtype=torch.long, device=DEVICE), logits.clone()).log_softmax(-1).cpu()
    probs, logprobs = process_logits(
        logits, torch.full((64,), temperature), torch.full((64,), top_k), torch.full((64,), top_p)
    )
    probs, logprobs = probs.cpu(), logprobs.cpu()
    assert torch.equal(torch.isinf(logprobs), torch.isinf(expected)), "same tokens kept"
    kept = ~torch.isinf(expected)
    assert (logprobs[kept] - expected[kept]).abs().max() <= 1e-5
    assert torch.allclose(probs.sum(-1), torch.ones(64), atol=1e-5)


@pytest.mark.exactness
def test_greedy_rows_are_point_masses_with_informative_logprobs():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 1.0, 0.0]])
    probs, logprobs = process_logits(
        logits.to(DEVICE), torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), torch.tensor([1.0, 1.0])
    )
    probs, logprobs = probs.cpu(), logprobs.cpu()
    assert probs[0].tolist() == [0.0, 1.0, 0.0]
    assert torch.allclose(logprobs[0], logits[0].log_softmax(-1))
    assert torch.allclose(probs[1], logits[1].softmax(-1))


@pytest.mark.exactness
def test_rows_keep_their_own_parameters():
    logits = torch.randn(3, 50, device=DEVICE)
    probs, _ = process_logits(
        logits, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, 2, 0]), torch.tensor([1.0, 1.0, 1e-6])
    )
    assert (probs[0] > 0).sum() == 50 and (probs[1] > 0).sum() == 2 and (probs[2] > 0).sum() == 1


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("temperature", -1, "temperature must be >= 0"),
        ("temperature", "hot", "temperature must be a finite number"),
        ("top_p", 0, r"top_p must be in \(0, 1\]"),
        ("top_k", -2, "top_k must be >= 0"),
        ("top_k", True, "top_k must be an integer"),
        ("max_tokens", 0, "max_tokens must be >= 1"),
        ("seed", 1.5, "seed must be an integer"),
        ("stop_token_ids", 5, "stop_token_ids must be a list of integers"),
        ("ignore_eos", "yes", "ignore_eos must be a bool"),
        ("top_logprobs", -1, "top_logprobs must be >= 0"),
        ("top_logprobs", 21, "top_logprobs must be <= 20"),
        ("top_logprobs", 2.0, "top_logprobs must be an integer"),
    ],
)
def test_bad_sampling_params_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})
