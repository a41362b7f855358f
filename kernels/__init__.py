"""Kernels for the engine: Triton kernels for the GPU and the pure-torch twins that define them.

Each module holds one operation; its `*_torch` function is the reference the Triton kernel must
match and the path the CPU engine runs. `ops.kernel_ops(device)` picks between them.
"""

import os

import torch

# Without a GPU build of torch (or when LLMSERVE_TRITON_ON_CPU=1 asks for Triton on CPU tensors)
# Triton can only run in its interpreter. Triton reads TRITON_INTERPRET when a kernel is
# decorated, its own library kernels at `import triton`, so the switch is set here, before any
# kernel module imports triton.
if os.environ.get("LLMSERVE_TRITON_ON_CPU") == "1" or (
    torch.version.cuda is None and torch.version.hip is None
):
    os.environ.setdefault("TRITON_INTERPRET", "1")
