"""Rotary position embedding, "rotate half" (GPT-NeoX) layout as Qwen and Llama use it.

The table and the torch form; on the GPU rotary is part of the fused `qkv_rope_store` kernel.
"""

import torch


def rotary_cos_sin(head_dim: int, max_positions: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Returns the [max_positions, head_dim] table: cos in the first half, sin in the second."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(positions, inv_freq.float())
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rotary_torch(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D] rotated at `positions` [T]; fp32 math, output in input dtype."""
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin[positions].split(half, dim=-1)
    cos = torch.cat([cos, cos], dim=-1)[:, None]
    sin = torch.cat([sin, sin], dim=-1)[:, None]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)

    return rotate(q), rotate(k)
