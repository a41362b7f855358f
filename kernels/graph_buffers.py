"""Kernel buffers that live across launches (arrival counters, constants), made once per
device before any CUDA graph capture."""

from collections.abc import Callable

import torch


def buffer_before_capture(cache: dict[torch.device, torch.Tensor], device: torch.device,
                          make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """cache[device], made by `make` at its first use, which must not be inside a CUDA graph
    capture (CudaGraphCapture runs every pass once eagerly first): a fill captured in a graph
    would not run until that graph's first replay."""
    if device not in cache:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a kernel's buffer must be made before CUDA graph capture")
        cache[device] = make()
    return cache[device]
