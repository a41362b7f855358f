"""The fused penalties kernel against its torch twin (Triton's interpreter on the CPU), and
compiled for Hopper without a GPU."""

import os
from collections.abc import Callable

import pytest
import torch

from llmserve.kernels.penalties import PROMPT_BIT, apply_penalties, apply_penalties_torch

ON_CPU = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                            reason="the CPU case runs in Triton's interpreter")
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CASES = [pytest.param("cpu", 6, 3000, marks=ON_CPU, id="cpu"),
         pytest.param("cuda", 256, 151936, marks=ON_GPU, id="cuda-w1-shape")]


@pytest.mark.parametrize(("device", "rows", "vocab"), CASES)
def test_kernel_equals_twin(device: str, rows: int, vocab: int) -> None:
    slots_total = rows + 3
    logits = torch.randn(rows + 2, vocab, device=device) * 4
    logits[0, :5] = float("-inf")  # banned by min_tokens before the penalties
    # Sparse counts, as a sequence's are: a few hundred tokens, some in the prompt.
    counts = torch.zeros(slots_total, vocab, dtype=torch.int32, device=device)
    for s in range(slots_total):
        ids = torch.randint(0, vocab, (200,), device=device)
        counts[s].index_add_(0, ids[:150], torch.ones(150, dtype=torch.int32, device=device))
        counts[s, ids[150:]] |= PROMPT_BIT
    counts[:, :5] = 1
    params = torch.stack([torch.empty(slots_total, device=device).uniform_(-2, 2),
                          torch.empty(slots_total, device=device).uniform_(-2, 2),
                          torch.empty(slots_total, device=device).uniform_(0.05, 2)], dim=1)
    params[1] = torch.tensor([0.0, 0.0, 1.0])  # a slot with a logit bias only: untouched
    # Some logits rows hold no slot; slots in another order than rows.
    rows_t = torch.randperm(rows + 2, device=device)[:rows]
    perm = torch.randperm(slots_total, device=device)
    slots_t = torch.cat([perm[perm == 1], perm[perm != 1]])[:rows]
    ours, theirs = logits.clone(), logits.clone()
    apply_penalties(ours, rows_t, slots_t, counts, params)
    apply_penalties_torch(theirs, rows_t, slots_t, counts, params)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
    assert not torch.equal(ours, logits)


COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llmserve.kernels import penalties

signature = {"logits_ptr": "*fp32", "rows_ptr": "*i64", "slots_ptr": "*i64",
             "counts_ptr": "*i32", "params_ptr": "*fp32", "vocab": "i32",
             "stride_logits": "i32", "stride_counts": "i32", "BLOCK": "constexpr",
             "PDL": "constexpr"}
triton.compile(ASTSource(penalties._penalties_kernel, signature, {"BLOCK": 1024, "PDL": True}),
               target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("compiled")
"""


def test_kernel_compiles_for_sm90(compile_for_sm90: Callable[[str], None]) -> None:
    compile_for_sm90(COMPILE)
