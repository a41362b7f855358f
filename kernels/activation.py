"""SiLU-and-mul: the gated MLP's activation on a fused gate/up projection; also fused with the
per-token e4m3 rounding of the FP8 down projection's input (`silu_and_mul_fp8`)."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmserve.kernels.dependent_launch import await_previous_kernel, dependent_launch
from llmserve.kernels.e4m3 import FP8_DTYPE, QuantizedRows
from llmserve.kernels.fp8_gemm import (
    MAX_ROW_BLOCK,
    quantize_rows_torch,
    quantize_rows_triton,
    store_e4m3_row,
)


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * I] = [gate | up] -> silu(gate) * up, [..., I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_times(gate, up):
    """silu(gate) * up in fp32, silu(gate) first rounded to gate's dtype as the twin rounds it."""
    gf = gate.to(tl.float32)
    return (gf * tl.sigmoid(gf)).to(gate.dtype).to(tl.float32) * up.to(tl.float32)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, width, stride_x, stride_o, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    await_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, _silu_times(gate, up).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of silu_and_mul_torch: x [..., 2 * I] = [gate | up] -> silu(gate) * up."""
    width = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * width)
    out = torch.empty(rows.shape[0], width, dtype=x.dtype, device=x.device)
    if rows.shape[0] and width:
        if rows.stride(-1) != 1:
            raise ValueError("silu_and_mul needs unit stride in the last dimension")
        block = min(triton.next_power_of_2(width), 1024)
        pdl = dependent_launch(x.device)
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(width, block))](
            rows, out, width, rows.stride(0), out.stride(0), BLOCK=block, PDL=pdl, launch_pdl=pdl,
        )
    return out.view(*x.shape[:-1], width)


def silu_and_mul_fp8_torch(x: torch.Tensor) -> QuantizedRows:
    """silu_and_mul_torch's rows rounded to e4m3 per token (quantize_rows_torch)."""
    return QuantizedRows(*quantize_rows_torch(silu_and_mul_torch(x)))


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, q_ptr, scale_ptr, width, stride_x, stride_q,
                             BLOCK: tl.constexpr, PDL: tl.constexpr):
    # One program per row: the rounding needs the whole row's largest magnitude.
    await_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0)
    # Rounded as the unfused pair rounds: the product to x's dtype before the e4m3 rounding.
    y = _silu_times(gate, up).to(gate.dtype).to(tl.float32)
    store_e4m3_row(y, q_ptr + row * stride_q + cols, scale_ptr + row, mask)


def silu_and_mul_fp8(x: torch.Tensor) -> QuantizedRows:
    """Triton twin of silu_and_mul_fp8_torch (x [M, 2 * I]), in one pass when a row fits one
    block; the same values (but the sign of zero)."""
    width = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * width)
    if width > MAX_ROW_BLOCK:
        return QuantizedRows(*quantize_rows_triton(silu_and_mul(rows)))
    q = torch.empty(rows.shape[0], width, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(rows.shape[0], 1, device=x.device)
    if rows.shape[0] and width:
        if rows.stride(-1) != 1:
            raise ValueError("silu_and_mul_fp8 needs unit stride in the last dimension")
        block = triton.next_power_of_2(width)
        pdl = dependent_launch(x.device)
        _silu_and_mul_fp8_kernel[(rows.shape[0],)](
            rows, q, scale, width, rows.stride(0), q.stride(0), BLOCK=block, PDL=pdl,
            launch_pdl=pdl, num_warps=min(max(block // 1024, 4), 16),
        )
    return QuantizedRows(q, scale)
