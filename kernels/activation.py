"""SiLU-and-mul: the gated MLP's activation on a fused gate/up projection; also fused with the
per-token e4m3 rounding of the FP8 down projection's input (`silu_and_mul_fp8`), which also
takes an FP8 gate/up projection's output before its scales (UnscaledProduct)."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmserve.kernels.dependent_launch import await_previous_kernel, dependent_launch
from llmserve.kernels.e4m3 import FP8_DTYPE, QuantizedRows, UnscaledProduct
from llmserve.kernels.fp8_gemm import (
    quantize_rows_torch,
    row_scale_of,
    store_e4m3,
    store_e4m3_row,
)

# Up to SILU_FP8_SPLIT_MAX_ROWS rows (decode) the FP8 kernel's rows are split into chunks of
# SILU_FP8_CHUNK columns, each its own program (a row per program was bound by its arithmetic
# on the few multiprocessors a decode step's rows occupy); a second kernel rounds each chunk
# once its row's largest magnitude is known. Longer batches keep a row per program, in two
# passes of SILU_FP8_BLOCK columns, the second reading the row again from L2 (measured on an
# H100: docs/benchmarks.md).
SILU_FP8_SPLIT_MAX_ROWS = 1024
SILU_FP8_CHUNK = 1024
SILU_FP8_BLOCK = 4096


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * I] = [gate | up] -> silu(gate) * up, [..., I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_times(gate, up, like):
    """silu(gate) * up in fp32, silu(gate) first rounded to the dtype of `like` (x's) as the
    twin rounds it."""
    gf = gate.to(tl.float32)
    return (gf * tl.sigmoid(gf)).to(like.dtype).to(tl.float32) * up.to(tl.float32)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, width, stride_x, stride_o, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    await_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, _silu_times(gate, up, gate).to(gate.dtype),
             mask=mask)


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


def silu_and_mul_fp8_torch(x: torch.Tensor | UnscaledProduct) -> QuantizedRows:
    """silu_and_mul_torch's rows rounded to e4m3 per token (quantize_rows_torch). An unscaled
    gate/up product has its scales applied in fp32 first; silu(gate) and the product are then
    rounded to the values' dtype, as for a scaled input."""
    if isinstance(x, UnscaledProduct):
        gate, up = x.scaled().chunk(2, dim=-1)
        act = F.silu(gate).to(x.values.dtype).float()
        return QuantizedRows(*quantize_rows_torch((act * up).to(x.values.dtype)))
    return QuantizedRows(*quantize_rows_torch(silu_and_mul_torch(x)))


@triton.jit
def _gated_chunk(x_row, row_scale, col_scale_ptr, cols, width, SCALE_X: tl.constexpr):
    """silu(gate) * up over columns `cols` of one row, rounded to x's dtype, in fp32."""
    mask = cols < width
    gate = tl.load(x_row + cols, mask=mask, other=0.0)
    up = tl.load(x_row + width + cols, mask=mask, other=0.0)
    if SCALE_X:  # an UnscaledProduct's values: gate and up columns each have their own scale
        g = gate.to(tl.float32) * row_scale * tl.load(col_scale_ptr + cols, mask=mask, other=0.0)
        u = up.to(tl.float32) * row_scale * tl.load(col_scale_ptr + width + cols, mask=mask,
                                                    other=0.0)
        y = _silu_times(g, u, gate)
    else:
        y = _silu_times(gate, up, gate)
    return y.to(gate.dtype).to(tl.float32)


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, q_ptr, scale_ptr, row_scale_ptr, col_scale_ptr, width,
                             stride_x, stride_q, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
                             SCALE_X: tl.constexpr, PDL: tl.constexpr):
    # One program per row (the rounding needs the row's largest magnitude): a row that fits
    # one block in one pass, a longer one in two passes over BLOCK columns at a time.
    await_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    row_scale = tl.load(row_scale_ptr + row) if SCALE_X else 1.0
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        y = _gated_chunk(x_row, row_scale, col_scale_ptr, cols, width, SCALE_X)
        store_e4m3_row(y, q_row + cols, scale_ptr + row, cols < width)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for start in range(0, width, BLOCK):
            y = _gated_chunk(x_row, row_scale, col_scale_ptr, start + cols, width, SCALE_X)
            amax = tl.maximum(amax, tl.abs(y))
        scale = row_scale_of(tl.max(amax, 0))
        for start in range(0, width, BLOCK):
            y = _gated_chunk(x_row, row_scale, col_scale_ptr, start + cols, width, SCALE_X)
            store_e4m3(y, scale, q_row + start + cols, start + cols < width)
        tl.store(scale_ptr + row, scale)


@triton.jit
def _silu_and_mul_chunk_kernel(x_ptr, y_ptr, amax_ptr, row_scale_ptr, col_scale_ptr, width,
                               stride_x, stride_y, BLOCK: tl.constexpr, SCALE_X: tl.constexpr,
                               PDL: tl.constexpr):
    # Program (chunk, row): the chunk's silu(gate) * up in x's dtype (exact: the rounding
    # the twin makes) and its largest magnitude.
    await_previous_kernel(PDL)
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    row_scale = tl.load(row_scale_ptr + row) if SCALE_X else 1.0
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    y = _gated_chunk(x_ptr + row * stride_x, row_scale, col_scale_ptr, cols, width, SCALE_X)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=cols < width)
    tl.store(amax_ptr + row * tl.num_programs(0) + chunk, tl.max(tl.abs(y), 0))


@triton.jit
def _round_chunk_kernel(y_ptr, amax_ptr, q_ptr, scale_ptr, width, stride_y, stride_q,
                        BLOCK: tl.constexpr, CHUNKS: tl.constexpr, PDL: tl.constexpr):
    # Program (chunk, row): the chunk rounded by its row's scale, from all chunks' maxima.
    await_previous_kernel(PDL)
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    parts = tl.arange(0, CHUNKS)
    amax = tl.load(amax_ptr + row * tl.num_programs(0) + parts,
                   mask=parts < tl.num_programs(0), other=0.0)
    scale = row_scale_of(tl.max(amax, 0))
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(y_ptr + row * stride_y + cols, mask=cols < width, other=0.0).to(tl.float32)
    store_e4m3(y, scale, q_ptr + row * stride_q + cols, cols < width)
    if chunk == 0:
        tl.store(scale_ptr + row, scale)


def silu_and_mul_fp8(x: torch.Tensor | UnscaledProduct) -> QuantizedRows:
    """Triton twin of silu_and_mul_fp8_torch (x [M, 2 * I], or an FP8 gate/up projection's
    UnscaledProduct), within e4m3's rounding of it (Triton's sigmoid is not torch's): for a
    tensor the values of silu_and_mul then quantize_rows_triton (but the sign of zero). Up to
    SILU_FP8_SPLIT_MAX_ROWS rows in chunks of SILU_FP8_CHUNK columns, two kernels; more rows
    a row per program, SILU_FP8_BLOCK columns at a time."""
    product = x if isinstance(x, UnscaledProduct) else None
    values = x if product is None else product.values
    width = values.shape[-1] // 2
    rows = values.reshape(-1, 2 * width)
    q = torch.empty(rows.shape[0], width, dtype=FP8_DTYPE, device=values.device)
    scale = torch.empty(rows.shape[0], 1, device=values.device)
    if rows.shape[0] and width:
        if rows.stride(-1) != 1:
            raise ValueError("silu_and_mul_fp8 needs unit stride in the last dimension")
        pdl = dependent_launch(values.device)
        row_scale = scale if product is None else product.row_scale
        col_scale = scale if product is None else product.col_scale
        if rows.shape[0] <= SILU_FP8_SPLIT_MAX_ROWS:
            chunks = triton.cdiv(width, SILU_FP8_CHUNK)
            gated = torch.empty(rows.shape[0], width, dtype=values.dtype, device=values.device)
            amax = torch.empty(rows.shape[0], chunks, device=values.device)
            grid = (chunks, rows.shape[0])
            _silu_and_mul_chunk_kernel[grid](
                rows, gated, amax, row_scale, col_scale, width, rows.stride(0),
                gated.stride(0), BLOCK=SILU_FP8_CHUNK, SCALE_X=product is not None, PDL=pdl,
                launch_pdl=pdl, num_warps=4,
            )
            _round_chunk_kernel[grid](
                gated, amax, q, scale, width, gated.stride(0), q.stride(0),
                BLOCK=SILU_FP8_CHUNK, CHUNKS=triton.next_power_of_2(chunks), PDL=pdl,
                launch_pdl=pdl, num_warps=4,
            )
            return QuantizedRows(q, scale)
        block = min(triton.next_power_of_2(width), SILU_FP8_BLOCK)
        _silu_and_mul_fp8_kernel[(rows.shape[0],)](
            rows, q, scale, row_scale, col_scale, width, rows.stride(0),
            q.stride(0), BLOCK=block, ONE_BLOCK=block >= width, SCALE_X=product is not None,
            PDL=pdl, launch_pdl=pdl, num_warps=8,
        )
    return QuantizedRows(q, scale)
