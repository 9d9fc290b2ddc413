"""Acceptance rules on hand-built distributions: exact greedy cases, then sampler statistics with 2e5 trials.

The statistical target is a Markov chain over a 10-token vocabulary: p(next | last) = processed(softmax(L[last])).
Speculative steps (draft -> verify -> emit) are simulated until every trial has two tokens; the joint distribution
of those two tokens must converge to p(t1 | 0) p(t2 | t1) at rate n^-1/2. A lossy verifier (no residual
resampling) runs through the same check as a negative control and must fail it.

The distributions live on SPECROLLOUT_TEST_DEVICE and everything else on the host, as in the engine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DEVICE

from rollout.sampling import draw_tokens, process_logits
from rollout.verify import VerifyResult, sample_inverse_cdf, verify, walk

pytestmark = pytest.mark.exactness

V = 10


def one_hot_rows(argmaxes: list[int]) -> torch.Tensor:
    p = torch.zeros(len(argmaxes), V)
    p[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 1.0
    return p


def run_one(probs_rows, tokens, parents, uniforms=None) -> VerifyResult:
    n = len(tokens)
    return verify(
        torch.as_tensor(probs_rows, dtype=torch.float32).to(DEVICE),
        torch.tensor([0]),
        torch.tensor([tokens], dtype=torch.int64).reshape(1, n),
        torch.tensor([parents], dtype=torch.int64).reshape(1, n),
        torch.full((1, n + 1), 0.5, dtype=torch.float64) if uniforms is None else torch.tensor([uniforms]),
    )


# (rows' argmax: root then each node, draft tokens, parents, expected accepted nodes, expected next token)
GREEDY_CASES = [
    # every draft token is the argmax: all accepted, the bonus comes from the last node
    ([1, 2, 3, 4], [1, 2, 3], [-1, 0, 1], [0, 1, 2], 4),
    # the first token is wrong: nothing accepted, the root's argmax is emitted
    ([1, 2, 3, 4], [7, 2, 3], [-1, 0, 1], [], 1),
    # right, then wrong: one accepted, node 0's argmax replaces the wrong token
    ([1, 2, 3, 4], [1, 9, 3], [-1, 0, 1], [0], 2),
    # tree: first candidate at the root wrong, second right, then its child right
    ([1, 5, 2, 6], [5, 1, 2], [-1, -1, 1], [1, 2], 6),
    # tree: both root candidates wrong; the child of a rejected node is never considered
    ([1, 5, 2, 6], [5, 4, 1], [-1, -1, 0], [], 1),
    # empty draft: plain decoding
    ([3], [], [], [], 3),
]


@pytest.mark.parametrize("argmaxes,tokens,parents,accepted,next_token", GREEDY_CASES)
def test_greedy_cases(argmaxes, tokens, parents, accepted, next_token):
    res = run_one(one_hot_rows(argmaxes), tokens, parents)
    assert res.accepted[0, : res.num_accepted[0]].tolist() == accepted
    assert res.next_token.item() == next_token


def test_certain_and_impossible_tokens():
    p = torch.tensor([[0.0, 1.0] + [0.0] * (V - 2), [0.5, 0.5] + [0.0] * (V - 2)])
    # p(x) = 1 is accepted whatever the uniform; the bonus row is then p's second row.
    assert run_one(p, [1], [-1], [0.999999, 0.1]).num_accepted.item() == 1
    # p(x) = 0 is never accepted, whatever the uniform.
    for u in (0.0, 0.3, 0.99):
        assert run_one(p, [0], [-1], [u, 0.1]).num_accepted.item() == 0


def test_rejected_token_leaves_the_residual():
    p = torch.tensor([[0.5, 0.5] + [0.0] * (V - 2), [1.0] + [0.0] * (V - 1)])
    for u in np.linspace(0.5, 0.999, 20):  # u outside token 0's interval [0, 0.5): rejected, token 1 emitted
        res = run_one(p, [0], [-1], [float(u), float(u)])
        assert res.num_accepted.item() == 0 and res.next_token.item() == 1
    for u in np.linspace(0.0, 0.499, 20):  # u inside it: accepted, and the next position uses the next uniform
        res = run_one(p, [0], [-1], [float(u), 0.5])
        assert res.num_accepted.item() == 1 and res.next_token.item() == 0


def test_the_rollout_does_not_depend_on_the_draft():
    """With one uniform per position, any draft leaves the emitted tokens as plain sampling would make them."""
    g = torch.Generator().manual_seed(4)
    table = torch.softmax(torch.randn(V, V, generator=g) * 2, -1).to(DEVICE)  # p(next | last) of a Markov chain
    u = torch.rand(40, generator=g, dtype=torch.float64)

    def rollout(draft_fn):
        out, last = [], 0
        while len(out) < 30:
            toks, pars = draft_fn(last)
            # The root's distribution, then each node's.
            rows = table[torch.tensor([last] + toks, dtype=torch.long, device=DEVICE)]
            # len(toks) + 1 uniforms cover the deepest possible path; unused ones are simply not read.
            res = verify(
                rows,
                torch.tensor([0]),
                torch.tensor([toks or [-1]]),
                torch.tensor([pars or [-1]]),
                u[len(out) : len(out) + len(toks) + 1][None],
            )
            path = res.accepted[0, : res.num_accepted[0]].tolist()
            out += [toks[j] for j in path] + [res.next_token.item()]
            last = out[-1]
        return out[:30]

    plain = rollout(lambda last: ([], []))
    rng = np.random.default_rng(0)
    assert rollout(lambda last: (rng.integers(0, V, 4).tolist(), [-1, 0, 1, 2])) == plain
    assert rollout(lambda last: (rng.integers(0, V, 4).tolist(), [-1, -1, 0, 1])) == plain


def test_batch_with_different_draft_lengths():
    probs = torch.cat([one_hot_rows([1, 2, 3]), one_hot_rows([4]), one_hot_rows([5, 6])]).to(DEVICE)
    res = verify(
        probs,
        torch.tensor([0, 3, 4]),
        torch.tensor([[1, 2], [-1, -1], [5, -1]]),
        torch.tensor([[-1, 0], [-1, -1], [-1, -1]]),
        torch.full((3, 3), 0.5, dtype=torch.float64),
    )
    assert res.num_accepted.tolist() == [2, 0, 1]
    assert res.next_token.tolist() == [3, 4, 6]


def test_inverse_cdf_never_picks_zero_mass():
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0]] * 5, device=DEVICE)
    u = torch.tensor([0.0, 0.2999, 0.30001, 0.9999999999, 1.0 - 1e-16], dtype=torch.float64)
    assert sample_inverse_cdf(probs, u).tolist() == [1, 1, 3, 3, 3]


def reference_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """sample_inverse_cdf as it was before the CPU path skipped the search for the last token with mass: kept as
    its reference."""
    cdf = probs.double().cumsum(-1)
    idx = torch.searchsorted(cdf, u.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:], right=True).squeeze(1)
    return torch.minimum(idx, probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1))


def test_inverse_cdf_equals_its_reference_where_rounding_reaches_the_end():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(512, 64, generator=g) ** 8  # many tiny masses
    probs[:, -5:] = 0.0  # trailing tokens without mass: a draw rounded onto the total must not land there
    probs[::7, 10:] = 0.0
    u = torch.rand(512, dtype=torch.float64, generator=g)
    u[::3] = 1.0  # u x total on the total itself, as rounding can put a u just below 1: the search runs off the end
    u[2::6] = 1.0 - 1e-16
    u[1::5] = 0.0
    cdf = probs.double().cumsum(-1)
    assert (torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True) >= 64).sum() > 100  # the fallback's rows
    drawn = sample_inverse_cdf(probs.to(DEVICE), u)
    assert torch.equal(drawn.cpu(), reference_inverse_cdf(probs, u))
    assert bool((probs.gather(1, drawn.cpu()[:, None]) > 0).all())


def test_verify_is_a_pure_function_of_its_uniforms():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(4 * 3, V, generator=g).to(DEVICE)
    args = (probs, torch.tensor([0, 3, 6, 9]), torch.randint(0, V, (4, 2), generator=g), torch.tensor([[-1, 0]] * 4))
    u = torch.rand(4, 3, generator=g, dtype=torch.float64)
    a, b = verify(*args, u), verify(*args, u.clone())
    assert torch.equal(a.accepted, b.accepted) and torch.equal(a.next_token, b.next_token)


# ---------------------------------------------------------------------------------------------- statistics


def random_batch(seed: int, vocab: int = 4):
    """A batch of random trees (chains, siblings, duplicates, empty drafts) with mixed per-row processing."""
    rng = np.random.default_rng(seed)
    b = int(rng.integers(1, 9))
    sizes = rng.integers(0, 7, b)
    n = max(int(sizes.max()), 1)
    tokens = np.full((b, n), -1, dtype=np.int64)
    parents = np.full((b, n), -1, dtype=np.int64)
    depths = np.zeros(b, dtype=np.int64)
    for i, size in enumerate(sizes):
        d = [0] * size
        for j in range(size):
            parents[i, j] = -1 if j == 0 or rng.random() < 0.2 else int(rng.integers(-1, j))
            d[j] = 1 if parents[i, j] < 0 else d[parents[i, j]] + 1
        tokens[i, :size] = rng.integers(0, vocab, size)
        depths[i] = max(d, default=0)
    counts = sizes + 1
    row_start = np.cumsum(counts) - counts
    rows = int(counts.sum())
    logits = torch.tensor(rng.normal(size=(rows, vocab)) * 2, dtype=torch.float32)
    seq_params = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 2, 1.0), (1.0, 0, 0.8)]
    params = [seq_params[int(rng.integers(0, 4))] for _ in range(b)]
    per_row = [torch.tensor(np.repeat([p[k] for p in params], counts)) for k in range(3)]
    per_row[1] = per_row[1].long()
    uniforms = rng.random((b, int(depths.max()) + 1))
    return logits, per_row, row_start, tokens, parents, uniforms


@pytest.mark.parametrize("seed", range(40))
def test_walk_matches_the_reference(seed):
    """The engine's walk on host arrays gives verify()'s result exactly, drawing per depth or every row at once."""
    logits, per_row, row_start, tokens, parents, uniforms = random_batch(seed)
    probs, _ = process_logits(logits, *per_row)
    ref = verify(probs, *(torch.from_numpy(a) for a in (row_start, tokens, parents, uniforms)))

    def per_depth(rows, u):
        at = torch.from_numpy(rows)
        return draw_tokens(logits[at], *(p[at] for p in per_row), torch.from_numpy(u))[0].numpy()

    # every row drawn beforehand with its own depth's uniform
    depth_of = np.zeros(len(logits), dtype=np.int64)
    for i, start in enumerate(row_start):
        for j in range((tokens[i] >= 0).sum()):
            p = parents[i, j]
            depth_of[start + j + 1] = 1 if p < 0 else depth_of[start + p + 1] + 1
    seq_of = np.repeat(np.arange(len(row_start)), np.diff(np.append(row_start, len(logits))))
    all_rows = per_depth(np.arange(len(logits)), uniforms[seq_of, depth_of])
    for draw in (per_depth, lambda rows, u: all_rows[rows]):
        got = walk(draw, row_start, tokens, parents, uniforms)
        assert torch.equal(got.accepted, ref.accepted)
        assert torch.equal(got.num_accepted, ref.num_accepted)
        assert torch.equal(got.next_token, ref.next_token)


def test_draw_tokens_is_the_inverse_cdf_of_the_processed_distribution():
    for seed in range(10):
        logits, per_row, *_ = random_batch(seed, vocab=50)
        u = torch.rand(len(logits), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        probs, logprobs = process_logits(logits, *per_row)
        tokens, got_logprobs = draw_tokens(logits, *per_row, u)
        assert torch.equal(tokens, sample_inverse_cdf(probs, u))
        assert torch.equal(got_logprobs, logprobs)


def lossy_walk(draw, row_start, draft_tokens, draft_parents, uniforms) -> VerifyResult:
    """Negative control for the engine's walk: where the target's draw misses the current node's first child, that
    child is accepted anyway three times in ten (decided by a number derived from the position's uniform but nearly
    independent of which token it drew), so drafted tokens come out too often."""
    b, n = draft_tokens.shape
    cur = np.full(b, -1)
    cur_row = row_start.copy()
    accepted = np.full((b, max(n, 1)), -1)
    num = np.zeros(b, dtype=np.int64)
    next_token = np.full(b, -1)
    for i in range(b):
        for depth in range(uniforms.shape[1]):
            u = uniforms[i, depth]
            y = int(draw(np.array([cur_row[i]]), np.array([u]))[0])
            children = [j for j in range(n) if draft_parents[i, j] == cur[i] and draft_tokens[i, j] >= 0]
            hits = [j for j in children if draft_tokens[i, j] == y]
            j = hits[0] if hits else (children[0] if children and (u * 9301.0 + 0.5) % 1.0 < 0.3 else None)
            if j is None:
                next_token[i] = y
                break
            accepted[i, num[i]] = j
            num[i] += 1
            cur[i], cur_row[i] = j, row_start[i] + j + 1
    return VerifyResult(*(torch.from_numpy(a) for a in (accepted[:, :n], num, next_token)))


def reference_processed(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Independent numpy implementation of temperature -> top-k -> top-p, one row at a time."""
    out = np.zeros_like(logits, dtype=np.float64)
    for r, row in enumerate(logits.astype(np.float64)):
        z = row / temperature
        if top_k:
            z = np.where(z < np.sort(z)[::-1][top_k - 1], -np.inf, z)
        p = np.exp(z - z.max())
        p /= p.sum()
        if top_p < 1:
            order = np.argsort(-p, kind="stable")
            mass_before = np.cumsum(p[order]) - p[order]
            keep = np.zeros_like(p, dtype=bool)
            keep[order[mass_before < top_p]] = True
            p = np.where(keep, p, 0.0)
            p /= p.sum()
        out[r] = p
    return out


def drafts_for(kind: str, target: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Deterministic drafts as a function of the last token: tokens [V, N] and shared parents [N]."""
    order = np.argsort(-target, axis=1, kind="stable")  # [V, V] most likely first
    best, second, third = order[:, 0], order[:, 1], order[:, 2]
    if kind == "chain":  # often right, then right again, then usually wrong
        return np.stack([best, best[best], (best[best] + 1) % V], 1), [-1, 0, 1]
    if kind == "tree":  # three root candidates tried second-best first, each with its own best child
        return np.stack([second, best, third, best[second], best[best], best[third]], 1), [-1, -1, -1, 0, 1, 2]
    if kind == "duplicates":  # the same token twice among siblings, the copy carrying a child
        return np.stack([best, best, second, best[best]], 1), [-1, -1, -1, 1]
    if kind == "unlikely":  # tokens outside the top-k / top-p set, i.e. with zero processed mass
        worst = order[:, -1]
        return np.stack([worst, order[:, -2], best], 1), [-1, -1, -1]
    raise KeyError(kind)


def lossy_verify(probs, row_start, draft_tokens, draft_parents, uniforms) -> VerifyResult:
    """Negative control: accepts a candidate x when u < p(x), but on rejection samples from p itself (no residual).

    A rejected x can then be drawn again, so drafted tokens come out too often.
    """
    get = probs.__getitem__ if isinstance(probs, torch.Tensor) else probs  # the engine passes a function

    def rows_of(rows: torch.Tensor) -> torch.Tensor:
        return get(rows).cpu()  # this control does its bookkeeping on the host, whatever device p lives on

    b, n = draft_tokens.shape
    cur = torch.full((b,), -1)
    cur_row = row_start.clone()
    accepted = torch.full((b, n), -1)
    num = torch.zeros(b, dtype=torch.int64)
    next_token = torch.full((b,), -1)
    active = torch.ones(b, dtype=torch.bool)
    for depth in range(uniforms.shape[1]):
        u = uniforms[:, depth].double()
        moved = torch.zeros(b, dtype=torch.bool)
        for j in range(n):
            tok = draft_tokens[:, j]
            ok = active & ~moved & (tok >= 0) & (draft_parents[:, j] == cur)
            ok &= u < rows_of(cur_row).double().gather(1, tok.clamp(min=0)[:, None]).squeeze(1)
            accepted[ok, num[ok]] = j
            num += ok.long()
            moved |= ok
            cur = torch.where(ok, j, cur)
            cur_row = torch.where(ok, row_start + j + 1, cur_row)
        stop = active & ~moved
        fresh = (u * 9301.0 + 0.5) % 1.0  # an independent-looking second draw
        drawn = sample_inverse_cdf(rows_of(cur_row), fresh)
        next_token = torch.where(stop, drawn, next_token)
        active &= moved
    return VerifyResult(accepted, num, next_token)


def simulate_two_tokens(verifier, target: np.ndarray, kind: str, n: int, seed: int) -> np.ndarray:
    """Run speculative steps from token 0 until each of n trials has emitted two tokens; returns [n, 2]."""
    g = torch.Generator().manual_seed(seed)
    table = torch.tensor(target, dtype=torch.float32, device=DEVICE)  # [V, V]
    draft_table, parents = drafts_for(kind, target)
    draft_table = torch.tensor(draft_table)
    k = len(parents)
    out = torch.full((n, 2), -1, dtype=torch.int64)
    have = torch.zeros(n, dtype=torch.int64)
    last = torch.zeros(n, dtype=torch.int64)
    while bool((have < 2).any()):
        idx = (have < 2).nonzero().squeeze(1)
        b = idx.numel()
        toks = draft_table[last[idx]]  # [b, k]
        rows = torch.cat([table[last[idx].to(DEVICE)][:, None], table[toks.to(DEVICE)]], 1).reshape(b * (k + 1), V)
        res = verifier(
            rows,
            torch.arange(b) * (k + 1),
            toks,
            torch.tensor(parents).expand(b, k),
            torch.rand(b, k + 1, generator=g, dtype=torch.float64),
        )
        emitted = torch.full((b, k + 1), -1, dtype=torch.int64)
        acc = res.accepted.clamp(min=0)
        emitted[:, :k] = torch.where(res.accepted >= 0, toks.gather(1, acc), -1)
        emitted[torch.arange(b), res.num_accepted] = res.next_token
        for i in range(k + 1):
            take = (emitted[:, i] >= 0) & (have[idx] < 2)
            rows_i = idx[take]
            out[rows_i, have[rows_i]] = emitted[take, i]
            last[rows_i] = emitted[take, i]
            have[rows_i] += 1
    return out.numpy()


def joint_target(target: np.ndarray) -> np.ndarray:
    return (target[0][:, None] * target).reshape(-1)  # [V*V]: p(t1 | 0) p(t2 | t1)


def tv(counts: np.ndarray, p: np.ndarray) -> float:
    return 0.5 * float(np.abs(counts / counts.sum() - p).sum())


def expected_tv(p: np.ndarray, n: int) -> float:
    """Mean total variation of an n-sample empirical distribution from p (normal approximation per cell)."""
    return 0.5 * float(np.sum(np.sqrt(2 * p * (1 - p) / (math.pi * n))))


PROCESSINGS = {"t1": (1.0, 0, 1.0), "t0.7": (0.7, 0, 1.0), "topk3": (1.0, 3, 1.0), "topp0.8": (1.0, 0, 0.8)}
SIZES = (2_000, 20_000, 200_000)


def logits_table() -> np.ndarray:
    rng = np.random.default_rng(7)
    return (rng.normal(size=(V, V)) * 1.5).astype(np.float32)


def check_converges(samples: np.ndarray, target: np.ndarray) -> tuple[list[float], float]:
    p = joint_target(target)
    codes = samples[:, 0] * V + samples[:, 1]
    tvs = [tv(np.bincount(codes[:m], minlength=V * V), p) for m in SIZES]
    slope = (math.log(tvs[-1]) - math.log(tvs[0])) / (math.log(SIZES[-1]) - math.log(SIZES[0]))
    return tvs, slope


@pytest.mark.parametrize("kind", ["chain", "tree", "duplicates", "unlikely"])
@pytest.mark.parametrize("processing", list(PROCESSINGS))
def test_sampled_distribution_matches_target(processing, kind):
    temperature, top_k, top_p = PROCESSINGS[processing]
    logits = logits_table()
    target = reference_processed(logits, temperature, top_k, top_p)
    # Our processing must give the same distribution the independent reference does.
    probs, _ = process_logits(
        torch.tensor(logits, device=DEVICE),
        torch.full((V,), temperature, device=DEVICE),
        torch.full((V,), top_k, device=DEVICE),
        torch.full((V,), top_p, device=DEVICE),
    )
    probs = probs.cpu().numpy()
    np.testing.assert_allclose(probs, target, atol=1e-6)

    samples = simulate_two_tokens(verify, probs, kind, SIZES[-1], seed=11)
    tvs, slope = check_converges(samples, target)
    bounds = [3 * expected_tv(joint_target(target), m) for m in SIZES]
    # A clearly wrong distribution: the same chain at a 25% higher temperature.
    wrong = joint_target(reference_processed(logits, temperature * 1.25, top_k, top_p))
    wrong_tv = tv(np.bincount(samples[:, 0] * V + samples[:, 1], minlength=V * V), wrong)
    print(
        f"{processing}/{kind}: TV {['%.4f' % t for t in tvs]} bounds {['%.4f' % b for b in bounds]} "
        f"slope {slope:.2f} wrong {wrong_tv:.4f}"
    )
    assert all(t <= b for t, b in zip(tvs, bounds))
    assert -0.8 <= slope <= -0.3
    assert wrong_tv > 5 * tvs[-1]


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_lossy_verifier_fails_the_same_check(kind):
    """The negative control: skipping residual resampling must be caught by the statistics above."""
    temperature, top_k, top_p = PROCESSINGS["t1"]
    target = reference_processed(logits_table(), temperature, top_k, top_p)
    samples = simulate_two_tokens(lossy_verify, target.astype(np.float32), kind, SIZES[-1], seed=11)
    tvs, _ = check_converges(samples, target)
    bound = 3 * expected_tv(joint_target(target), SIZES[-1])
    print(f"lossy/{kind}: TV {tvs[-1]:.4f} vs bound {bound:.4f}")
    assert tvs[-1] > 5 * bound
