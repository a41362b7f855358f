"""The one-pass sampling kernels against their twin with the sampler's own keyed noise, against the
sampler's softmax-and-race draw, and compiled for Hopper without a GPU."""

import os
from collections.abc import Callable

import pytest
import torch

from llmserve.engine_service.runner.sampler import Sampler, SamplingBatch, keyed_uniform
from llmserve.kernels.sampling import gumbel_sample, gumbel_sample_torch

ON_CPU = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                            reason="the CPU case runs in Triton's interpreter")
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CASES = [pytest.param("cpu", 16, 3000, marks=ON_CPU, id="cpu"),
         pytest.param("cuda", 256, 151936, marks=ON_GPU, id="cuda-w1-shape")]


def batch(device: str, rows: int, vocab: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, vocab, generator=generator) * 3).to(device)
    temperature = torch.rand(rows, generator=generator).add(0.3).to(device)
    # Seeds over the whole uint64 range, stored as int64 the way the engine stores them.
    seeds = torch.randint(-(1 << 63), (1 << 63) - 1, (rows,), generator=generator).to(device)
    positions = torch.randint(0, 5000, (rows,), generator=generator).to(device)
    return logits, temperature, seeds, positions


@pytest.mark.parametrize(("device", "rows", "vocab"), CASES)
def test_kernel_equals_twin_with_the_samplers_noise(device, rows, vocab) -> None:
    logits, temperature, seeds, positions = batch(device, rows, vocab)
    uniform = keyed_uniform(seeds, positions, vocab)
    expected = gumbel_sample_torch(logits, temperature, uniform)
    assert torch.equal(gumbel_sample(logits, temperature, seeds, positions), expected)


@pytest.mark.parametrize(("device", "rows", "vocab"), CASES)
def test_kernel_equals_twin_when_cold(device, rows, vocab) -> None:
    """Large logits over small temperatures: scores in the thousands still race exactly."""
    logits, temperature, seeds, positions = batch(device, rows, vocab)
    logits, temperature = logits * 10, temperature * 0.05
    uniform = keyed_uniform(seeds, positions, vocab)
    expected = gumbel_sample_torch(logits, temperature, uniform)
    assert torch.equal(gumbel_sample(logits, temperature, seeds, positions), expected)


# Pairs of token ids two contenders sit at, with 2 parts of 2048 ids over a vocabulary of 3000:
# the same lane of one part, two lanes of one part, two parts.
PAIRS = {"same-lane": (5, 5 + 1024), "two-lanes": (5, 6), "two-parts": (5, 2100)}


@pytest.mark.parametrize("pair", list(PAIRS), ids=list(PAIRS))
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=ON_CPU),
                                    pytest.param("cuda", marks=ON_GPU)])
def test_kernel_settles_near_ties_as_the_twin(device, pair) -> None:
    """Two tokens whose fp64 scores differ by less than fp32 resolves: the kernel's fp32 pass
    cannot order them, and its fp64 pass must pick the twin's winner."""
    first, second = PAIRS[pair]
    rows, vocab = 64, 3000
    seeds = torch.arange(rows, dtype=torch.int64) * 7919 + 11
    positions = torch.full((rows,), 3, dtype=torch.int64)
    gumbel = torch.log(-torch.log(keyed_uniform(seeds, positions, vocab)))
    logits = torch.full((rows, vocab), -30.0, dtype=torch.float64)
    logits[:, first] = 5.0
    # Scores first - g[first] and second - g[second] + gap, gaps from -5e-8 to 5e-8.
    gaps = torch.linspace(-5e-8, 5e-8, rows, dtype=torch.float64)
    logits[:, second] = 5.0 + gumbel[:, second] - gumbel[:, first] + gaps
    logits = logits.float().to(device)
    temperature = torch.ones(rows, device=device)
    seeds, positions = seeds.to(device), positions.to(device)
    expected = gumbel_sample_torch(logits, temperature, keyed_uniform(seeds, positions, vocab))
    assert set(expected.tolist()) == {first, second}
    assert torch.equal(gumbel_sample(logits, temperature, seeds, positions, splits=2), expected)


@pytest.mark.parametrize(("device", "rows", "vocab"), CASES)
def test_twin_draws_what_the_sampler_draws(device, rows, vocab) -> None:
    logits, temperature, seeds, positions = batch(device, rows, vocab)
    sampling = SamplingBatch(
        temperature=temperature, top_p=torch.ones_like(temperature),
        top_k=torch.zeros_like(seeds), min_p=torch.zeros_like(temperature), seeds=seeds,
        positions=positions, num_logprobs=[None] * rows)
    theirs, _ = Sampler()(logits, sampling)
    ours = gumbel_sample_torch(logits, temperature, keyed_uniform(seeds, positions, vocab))
    # The same race; only the sampler's fp32 softmax rounding can split a near-tie.
    assert sum(a == b for a, b in zip(ours.tolist(), theirs, strict=True)) >= rows * 0.95


def test_twin_follows_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    temperature = torch.full((20000,), 0.7)
    uniform = keyed_uniform(torch.full((20000,), 12345), torch.arange(20000), 4)
    counts = torch.bincount(gumbel_sample_torch(logits, temperature, uniform), minlength=4)
    expected = torch.softmax(logits[0] / 0.7, dim=-1)
    assert torch.allclose(counts / 20000, expected, atol=0.01)


COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llmserve.kernels import sampling

signature = {"logits_ptr": "*fp32", "temperature_ptr": "*fp32", "seeds_ptr": "*i64",
             "positions_ptr": "*i64", "best_ptr": "*fp64", "best_id_ptr": "*i32",
             "vocab": "i32", "stride_row": "i32", "span": "i32", "BLOCK": "constexpr",
             "SPLITS": "constexpr", "FAST_LOG": "constexpr", "PDL": "constexpr"}
triton.compile(ASTSource(sampling._gumbel_kernel, signature,
                         {"BLOCK": 1024, "SPLITS": 16, "FAST_LOG": True, "PDL": True}),
               target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
signature = {"best_ptr": "*fp64", "best_id_ptr": "*i32", "out_ptr": "*i64", "vocab": "i32",
             "SPLITS": "constexpr", "PDL": "constexpr"}
triton.compile(ASTSource(sampling._pick_kernel, signature, {"SPLITS": 16, "PDL": True}),
               target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
print("compiled")
"""


def test_kernel_compiles_for_sm90(compile_for_sm90: Callable[[str], None]) -> None:
    compile_for_sm90(COMPILE)
