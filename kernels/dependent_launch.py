"""Programmatic dependent launch (PDL, Hopper and newer) for the Triton kernels.

A decode step is ~300 short kernels, and each one's launch and ramp-up costs a few microseconds
that the GPU spends idle between kernels. A kernel launched with PDL is scheduled while the
kernel before it in the stream is still finishing; it then waits in `await_previous_kernel`
until that kernel's writes are visible. Every PDL kernel waits first thing, before any load,
store or early return: the wait is what makes the next kernel's wait cover all earlier ones.

LLMSERVE_PDL=0 turns it off (to measure what it gives, or if a driver misbehaves).
"""

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.cache
def _enabled(device_index: int) -> bool:
    # Read once per device: every kernel launch outside the CUDA graphs asks.
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("LLMSERVE_PDL") == "0":
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def dependent_launch(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: CUDA at compute capability 9.0 or newer,
    compiled (the interpreter has no grid dependency control) and not turned off."""
    if device.type != "cuda":
        return False
    return _enabled(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def await_previous_kernel(PDL: tl.constexpr):
    """Waits for the previous kernel's writes, then lets the next kernel be scheduled (it runs
    its own wait before touching memory, so it cannot overtake this one)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
