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
    """q [T, Hq, D], k [T, Hkv, D] rotated at `positions` [T], in the input dtype.

    Rounded where Hugging Face rounds: cos and sin to the input dtype, then each product and
    their sum (no-ops in fp32). A bf16 model's logits drift from its own by that much otherwise.
    """
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin[positions].split(half, dim=-1)
    cos = torch.cat([cos, cos], dim=-1)[:, None]
    sin = torch.cat([sin, sin], dim=-1)[:, None]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)

    return rotate(q), rotate(k)
