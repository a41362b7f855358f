"""Pulling the start of a linear layer's weight into L2 while the short kernels before it run.

At decode's batch sizes a GEMM reads its weight once, and cuBLAS (which torch cannot launch
with PDL) starts reading only after the kernel before it has finished: the memory system idles
through the short pointwise kernels between GEMMs and through each GEMM's ramp. `prefetch_l2`
launches a tiny kernel ahead of those pointwise kernels whose programs ask the copy engine of
their multiprocessor (`cp.async.bulk.prefetch.L2`) for the first bytes of the next GEMM's
weight, so that much is in L2 when the GEMM starts. The weights are constant while a step
runs, so the prefetch may start before the kernel ahead of it has finished; the kernel then
waits for it as every PDL kernel does, so the chain of waits stays unbroken.

A no-op off CUDA, in the interpreter, before Hopper, and with LLMSERVE_L2_PREFETCH_MB=0 (to
measure what it gives).
"""

import functools
import os

import torch
import triton
import triton.language as tl

from llmserve.kernels.dependent_launch import dependent_launch

CHUNK = 16384  # bytes a prefetch instruction asks for
CHUNKS_PER_PROGRAM = 32  # one per lane of a warp
# Bytes of a weight prefetched: about what HBM delivers during the pointwise kernels before a
# GEMM, and well under L2's 50 MB so the part fetched first is not evicted by the rest.
DEFAULT_PREFETCH_MB = 16


@functools.cache
def prefetch_bytes() -> int:
    """The bytes `prefetch_l2` fetches of a weight (read once: LLMSERVE_L2_PREFETCH_MB)."""
    mb = float(os.environ.get("LLMSERVE_L2_PREFETCH_MB", DEFAULT_PREFETCH_MB))
    if not 0 <= mb <= 1024:
        raise ValueError(f"LLMSERVE_L2_PREFETCH_MB must be within [0, 1024], got {mb}")
    return int(mb * 2**20)


@triton.jit
def _prefetch_l2_kernel(base, nbytes, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr):
    # Dependents may start at once: their own wait covers this kernel, whose wait below covers
    # the kernel before it.
    tl.extra.cuda.gdc_launch_dependents()
    offsets = (tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)).to(tl.int64) * CHUNK
    # Lanes past the end repeat the last chunk (the size stays a multiple of 16 bytes).
    offsets = tl.minimum(offsets, nbytes - CHUNK)
    tl.inline_asm_elementwise(
        f"cp.async.bulk.prefetch.L2.global [$1], {CHUNK}; mov.u32 $0, 0;",
        "=r,l", [base + offsets], dtype=tl.int32, is_pure=False, pack=1,
    )
    tl.extra.cuda.gdc_wait()


def prefetch_l2(weight: torch.Tensor) -> None:
    """Starts pulling the first `prefetch_bytes()` of `weight` (contiguous) into L2."""
    nbytes = min(weight.numel() * weight.element_size(), prefetch_bytes())
    if nbytes < CHUNK or not dependent_launch(weight.device):
        return
    nbytes -= nbytes % 16
    bytes_view = weight.view(-1).view(torch.uint8)
    grid = (triton.cdiv(nbytes, CHUNK * CHUNKS_PER_PROGRAM),)
    _prefetch_l2_kernel[grid](bytes_view, nbytes, CHUNK=CHUNK, PER_PROGRAM=CHUNKS_PER_PROGRAM,
                              launch_pdl=True, num_warps=1)
