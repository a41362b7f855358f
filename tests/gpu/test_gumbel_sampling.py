"""The one-pass sampling kernels against its twin with the sampler's own keyed noise, against the
sampler's softmax-and-race draw, and compiled for Hopper without a GPU."""

import os
import subprocess
import sys

import pytest
import torch

from llmserve.engine_service.sampler import Sampler, SamplingBatch, keyed_uniform
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
             "SPLITS": "constexpr"}
triton.compile(ASTSource(sampling._gumbel_kernel, signature, {"BLOCK": 1024, "SPLITS": 16}),
               target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
signature = {"best_ptr": "*fp64", "best_id_ptr": "*i32", "out_ptr": "*i64", "vocab": "i32",
             "SPLITS": "constexpr"}
triton.compile(ASTSource(sampling._pick_kernel, signature, {"SPLITS": 16}),
               target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
print("compiled")
"""


def test_kernel_compiles_for_sm90() -> None:
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0", "LLMSERVE_TRITON_ON_CPU": "0"}
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
