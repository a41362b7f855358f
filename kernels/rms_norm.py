"""RMSNorm, alone and fused with the residual add that precedes it in every decoder layer;
each also fused with the per-token e4m3 rounding of an FP8 linear's input (`*_fp8`). The add
also takes an FP8 linear's output before its scales (UnscaledProduct) and applies them."""

import torch
import triton
import triton.language as tl

from llmserve.kernels.dependent_launch import await_previous_kernel, dependent_launch
from llmserve.kernels.e4m3 import FP8_DTYPE, QuantizedRows, UnscaledProduct
from llmserve.kernels.fp8_gemm import quantize_rows_torch, store_e4m3_row


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalizes the last dimension in fp32, then scales (the order Hugging Face uses)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_torch(
    x: torch.Tensor | UnscaledProduct, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual): the sum in fp32, rounded once to the
    residual stream's dtype."""
    if isinstance(x, UnscaledProduct):
        summed = (x.scaled() + residual.float()).to(residual.dtype)
    else:
        summed = x + residual
    return rms_norm_torch(summed, weight, eps), summed


def rms_norm_fp8_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> QuantizedRows:
    """rms_norm_torch's rows rounded to e4m3 per token (quantize_rows_torch)."""
    return QuantizedRows(*quantize_rows_torch(rms_norm_torch(x, weight, eps)))


def add_rms_norm_fp8_torch(
    x: torch.Tensor | UnscaledProduct, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[QuantizedRows, torch.Tensor]:
    normed, summed = add_rms_norm_torch(x, residual, weight, eps)
    return QuantizedRows(*quantize_rows_torch(normed)), summed


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr, scale_ptr, x_row_scale_ptr,
    x_col_scale_ptr, eps, stride_x, stride_r, stride_o, stride_s,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
    SCALE_X: tl.constexpr, QUANTIZE: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if SCALE_X:  # an UnscaledProduct's values (only with ADD_RESIDUAL)
        x = x.to(tl.float32) * tl.load(x_row_scale_ptr + row)
        x = x * tl.load(x_col_scale_ptr + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # Rounded to the stream's dtype before the norm reads it, exactly as the twin does.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(summed_ptr.dtype.element_ty)
        tl.store(summed_ptr + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    # The twin rounds the normalized row to x's dtype before the weight multiplies it.
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if QUANTIZE:
        # out is e4m3: the row rounded to x's dtype first, as the unfused pair rounds it.
        y = (normed * weight).to(x.dtype).to(tl.float32)
        store_e4m3_row(y, out_ptr + row * stride_o + cols, scale_ptr + row, mask)
    else:
        tl.store(out_ptr + row * stride_o + cols, (normed * weight).to(out_ptr.dtype.element_ty),
                 mask=mask)


def _launch_norm(x: torch.Tensor | UnscaledProduct, residual: torch.Tensor | None,
                 weight: torch.Tensor, eps: float, quantize: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(normed rows, or their e4m3 values; x + residual; the e4m3 rows' scales)."""
    product = x if isinstance(x, UnscaledProduct) else None
    if product is not None:
        assert residual is not None, "an unscaled product is only added to the residual"
        x = product.values
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    stream_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(rows.shape, device=x.device, dtype=FP8_DTYPE if quantize
                      else torch.promote_types(weight.dtype, stream_dtype))
    scale = torch.empty(rows.shape[0], 1, device=x.device) if quantize else None
    summed = None
    res_rows = rows
    if residual is not None:
        res_rows = residual.reshape(-1, hidden)
        summed = torch.empty(rows.shape, dtype=stream_dtype, device=x.device)
    if rows.shape[0]:
        if rows.stride(-1) != 1 or res_rows.stride(-1) != 1 or weight.stride(-1) != 1:
            raise ValueError("rms_norm needs unit stride in the hidden dimension")
        block = triton.next_power_of_2(hidden)
        pdl = dependent_launch(x.device)
        _rms_norm_kernel[(rows.shape[0],)](
            rows, res_rows, weight, out, out if summed is None else summed,
            out if scale is None else scale,
            weight if product is None else product.row_scale,
            weight if product is None else product.col_scale, eps,
            rows.stride(0), res_rows.stride(0), out.stride(0),
            out.stride(0) if summed is None else summed.stride(0),
            HIDDEN=hidden, BLOCK=block, ADD_RESIDUAL=residual is not None,
            SCALE_X=product is not None, QUANTIZE=quantize,
            PDL=pdl, launch_pdl=pdl,
            num_warps=min(max(block // 256, 1), 16),
        )
    return out.view(x.shape), None if summed is None else summed.view(x.shape), scale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton twin of rms_norm_torch over the last dimension of x (one program per row)."""
    return _launch_norm(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor | UnscaledProduct, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of add_rms_norm_torch: (rms_norm(x + residual), x + residual) in one pass."""
    normed, summed, _ = _launch_norm(x, residual, weight, eps)
    assert summed is not None
    return normed, summed


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> QuantizedRows:
    """Triton twin of rms_norm_fp8_torch (x [M, hidden]): the norm and the rounding in one pass,
    the same values (but the sign of zero)."""
    values, _, scale = _launch_norm(x, None, weight, eps, quantize=True)
    assert scale is not None
    return QuantizedRows(values, scale)


def add_rms_norm_fp8(
    x: torch.Tensor | UnscaledProduct, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[QuantizedRows, torch.Tensor]:
    """Triton twin of add_rms_norm_fp8_torch, in one pass."""
    values, summed, scale = _launch_norm(x, residual, weight, eps, quantize=True)
    assert summed is not None and scale is not None
    return QuantizedRows(values, scale), summed
