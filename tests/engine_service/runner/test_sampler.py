"""Sampler: greedy, seeded draws independent of the batch, filters, logprobs."""

import pytest
import torch

from llmserve.engine_service.runner.sampler import Sampler, SamplingBatch, keyed_uniform
from llmserve.engine_service.seam import SamplingOptions


def batch(
    n: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seeds: list[int] | None = None,
    logprobs: int | None = None,
) -> SamplingBatch:
    return SamplingBatch(
        temperature=torch.full((n,), temperature),
        top_p=torch.full((n,), top_p),
        top_k=torch.full((n,), top_k, dtype=torch.int64),
        min_p=torch.full((n,), min_p),
        seeds=torch.tensor(seeds or list(range(n)), dtype=torch.int64),
        positions=torch.full((n,), 5, dtype=torch.int64),
        num_logprobs=[logprobs] * n,
    )


def test_greedy_is_argmax_and_logprobs_are_log_softmax() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = Sampler()(logits, batch(3, temperature=0.0, logprobs=3))
    assert tokens == logits.argmax(-1).tolist()
    reference = torch.log_softmax(logits, -1)
    for row, lp in enumerate(logprobs):
        assert lp is not None and lp.token_id == tokens[row]
        assert abs(lp.logprob - reference[row, tokens[row]].item()) < 1e-6
        assert [t for t, _ in lp.top] == reference[row].topk(3).indices.tolist()


@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-20, 9e-6])
def test_tiny_temperature_draws_the_top_token(temperature: float) -> None:
    # Unfloored, 1e-45 and 1e-39 overflow logits / T to inf: NaN probabilities, token 0 always.
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(2)) * 8
    assert (logits.argmax(-1) != 0).all()
    options = SamplingOptions(temperature=temperature)
    tokens, _ = Sampler()(logits, batch(16, temperature=options.temperature))
    assert tokens == logits.argmax(-1).tolist()


def test_seeded_draw_is_independent_of_batch_neighbours() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 100, generator=gen)
    alone, _ = Sampler()(logits[3:4], batch(1, seeds=[42]))
    seeds = [9, 8, 7, 42, 6, 5, 4, 3]
    together, _ = Sampler()(logits, batch(8, seeds=seeds))
    assert together[3] == alone[0]


def test_top_k_top_p_min_p_restrict_support() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    seeds = list(range(400))
    for kwargs, allowed in [
        ({"top_k": 2}, {0, 1}),
        ({"top_p": 0.7}, {0, 1}),
        ({"min_p": 0.4}, {0, 1}),
        ({}, {0, 1, 2, 3}),
    ]:
        tokens, _ = Sampler()(logits, batch(400, seeds=seeds, **kwargs))
        assert set(tokens) == allowed, kwargs


def test_keyed_uniform_is_uniform_and_deterministic() -> None:
    seeds = torch.tensor([1, 2**63 - 1, -5], dtype=torch.int64)
    u = keyed_uniform(seeds, torch.tensor([0, 1, 2]), 20000)
    assert torch.equal(u, keyed_uniform(seeds, torch.tensor([0, 1, 2]), 20000))
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1])


# 99.9th percentile of the chi-square distribution by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def reference_distribution(
    probs: torch.Tensor, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """The filtered, renormalized distribution, written the plain way (one row)."""
    order = probs.argsort(descending=True)
    kept = torch.zeros_like(probs)
    mass = 0.0
    for rank, token in enumerate(order.tolist()):
        p = probs[token].item()
        if rank > 0 and ((top_k and rank >= top_k) or mass >= top_p or p < min_p * probs.max()):
            continue
        kept[token] = p
        mass += p
    return kept / kept.sum()


def test_filtered_sampling_matches_reference_distribution() -> None:
    probs = torch.tensor([0.3, 0.2, 0.15, 0.12, 0.09, 0.06, 0.05, 0.03])
    logits = torch.log(probs)[None].repeat(6000, 1)
    for top_k, top_p, min_p in [
        (0, 1.0, 0.0),
        (4, 1.0, 0.0),
        (0, 0.7, 0.0),
        (0, 1.0, 0.3),
        (5, 0.8, 0.1),
    ]:
        expected = reference_distribution(probs, top_k, top_p, min_p)
        tokens, _ = Sampler()(
            logits,
            batch(6000, top_k=top_k, top_p=top_p, min_p=min_p, seeds=list(range(10_000, 16_000))),
        )
        counts = torch.bincount(torch.tensor(tokens), minlength=8).float()
        support = expected > 0
        assert (counts[~support] == 0).all()
        exp_counts = expected[support] * 6000
        chi2 = ((counts[support] - exp_counts) ** 2 / exp_counts).sum().item()
        assert chi2 < CHI2_999[int(support.sum()) - 1], (top_k, top_p, min_p, chi2)
