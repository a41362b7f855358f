"""Rotary position embedding, "rotate half" (GPT-NeoX) layout as Qwen and Llama use it."""

import torch
import triton
import triton.language as tl


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


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, token, stride_st, stride_sh, stride_dt, stride_dh, cos, sin,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (cols < HALF)
    src = src_ptr + token * stride_st + heads * stride_sh + cols
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = dst_ptr + token * stride_dt + heads * stride_dh + cols
    tl.store(dst, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cs,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    table = cos_sin_ptr + pos * stride_cs + cols
    cos = tl.load(table, mask=cols < HALF, other=0.0)
    sin = tl.load(table + HALF, mask=cols < HALF, other=0.0)
    _rotate_heads(q_ptr, q_out_ptr, token, stride_qt, stride_qh, stride_qot, stride_qoh, cos, sin,
                  NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, token, stride_kt, stride_kh, stride_kot, stride_koh, cos, sin,
                  NUM_K_HEADS, HALF, BLOCK_KH, BLOCK_HALF)


def apply_rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of apply_rotary_torch: new rotated q [T, Hq, D] and k [T, Hkv, D].

    One program per token rotates all its query and key heads with one read of its cos/sin row
    (fp32 table as rotary_cos_sin builds it); q and k may be strided views (e.g. of a fused qkv).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if cos_sin.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(
            f"cos_sin width {cos_sin.shape[-1]} must equal the even head_dim {head_dim}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin.stride(-1) != 1:
        raise ValueError("q, k and cos_sin need unit stride in their last dimension")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            positions, q, k, q_out, k_out, cos_sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin.stride(0),
            NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HALF=half,
            BLOCK_QH=triton.next_power_of_2(num_q_heads),
            BLOCK_KH=triton.next_power_of_2(num_k_heads),
            BLOCK_HALF=triton.next_power_of_2(half),
        )
    return q_out, k_out
