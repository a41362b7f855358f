"""Triton kernels of the FP8 linears (`fp8_linear` picks among them; its torch functions are the
twins):

- `quantize_rows_triton`: each row's e4m3 values and fp32 scale in one kernel (torch needs ~7),
  the values of `quantize_rows_torch` (bit for bit but for the sign of zero).
- `w8a16_gemv`: one row of x (decode). Weight bytes dominate, so the kernel streams the e4m3
  weight once and dequantizes it in registers against x as given (no activation rounding):
  out = (x @ w8^T) * scale, accumulated in fp32 on FMAs; tiles of few weight rows give every
  SM several programs.
- `w8a8_gemm`: several rows. Both operands e4m3 on the tensor cores (wgmma on Hopper, fast
  accumulation), the row and column scales and the bias applied once, in the epilogue.

`GEMV_CONFIG` and `GEMM_CONFIG` are the tiles `fp8_linear` launches (measured on an H100, see
docs/benchmarks.md); `GEMV_CONFIGS` and `GEMM_CONFIGS` are the few that benchmarks/fp8_linear.py
sweeps.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmserve.kernels.dependent_launch import await_previous_kernel, dependent_launch
from llmserve.kernels.e4m3 import FP8_DTYPE, FP8_MAX
from llmserve.kernels.fp8_kv import fp8_values, to_e4m3

# Zero rows (padding in CUDA graphs) get this scale instead of 0, so they quantize to 0, not NaN.
MIN_SCALE = torch.finfo(torch.float32).tiny
_MAX = tl.constexpr(FP8_MAX)  # the kernels' copies (Triton reads only constexpr globals)
_MIN_SCALE = tl.constexpr(MIN_SCALE)
# Rows a program of the quantizer keeps in registers; longer rows take two passes.
MAX_ROW_BLOCK = 16384


def quantize_rows_torch(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scales [..., 1]) with each row's largest magnitude mapped to 448:
    the rounding llm-compressor applies to weights (per output channel) and activations (per
    token), so weights quantized here equal the ones it writes."""
    t = t.float()
    # Divided by a tensor: CUDA turns a division by a Python number into a multiplication by
    # its reciprocal, which can land one ulp off the quotient the Triton kernel rounds to.
    amax = t.abs().amax(dim=-1, keepdim=True)
    scale = (amax / torch.full_like(amax, FP8_MAX)).clamp(min=MIN_SCALE)
    return (t / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


@triton.jit
def row_scale_of(amax):
    """A row's scale from its largest magnitude, as quantize_rows_torch takes it: the division
    rounded (tl.div_rn, not Triton's approximate `/`), then the clamp, so the scale and every
    value divided by it are torch's bit for bit."""
    return tl.maximum(tl.div_rn(amax, _MAX), _MIN_SCALE)


@triton.jit
def store_e4m3(y, scale, q_ptrs, mask):
    tl.store(q_ptrs, to_e4m3(fp8_values(y, scale, ROUND_BY_HAND=False)), mask=mask)


@triton.jit
def store_e4m3_row(y, q_ptrs, scale_ptr, mask):
    """Stores fp32 row `y` as e4m3 at q_ptrs and its scale at scale_ptr, the values and scale
    quantize_rows_torch gives."""
    scale = row_scale_of(tl.max(tl.abs(y), 0))
    store_e4m3(y, scale, q_ptrs, mask)
    tl.store(scale_ptr, scale)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q,
    BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        store_e4m3_row(x, q_row + cols, scale_ptr + row, cols < K)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for start in range(0, K, BLOCK):
            x = tl.load(x_row + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        # As store_e4m3_row, over a row too long for one block.
        scale = row_scale_of(tl.max(amax, 0))
        for start in range(0, K, BLOCK):
            x = tl.load(x_row + start + cols, mask=start + cols < K, other=0.0).to(tl.float32)
            store_e4m3(x, scale, q_row + start + cols, start + cols < K)
        tl.store(scale_ptr + row, scale)


def quantize_rows_triton(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `quantize_rows_torch` (any float dtype, rows along the last dimension):
    one program per row. The same values; only -0.0 comes out as +0.0."""
    k = t.shape[-1]
    rows = t.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    q = torch.empty(rows.shape, dtype=FP8_DTYPE, device=t.device)
    scale = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=t.device)
    if rows.shape[0] and k:
        block = min(triton.next_power_of_2(k), MAX_ROW_BLOCK)
        pdl = dependent_launch(t.device)
        _quantize_rows_kernel[(rows.shape[0],)](
            rows, q, scale, k, rows.stride(0), q.stride(0),
            BLOCK=block, ONE_BLOCK=block >= k, PDL=pdl, launch_pdl=pdl,
            # A warp per 256 columns, as the RMSNorm: a decode step's few rows, one program
            # each, are bound by each program's arithmetic (docs/benchmarks.md).
            num_warps=min(max(block // 256, 4), 16),
        )
    return q.view(t.shape), scale.view(*t.shape[:-1], 1)


def _product_output(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype,
                    kernel: str) -> torch.Tensor:
    """The [M, N] output of x [M, K] @ weight [N, K]^T, once both kernels' layout holds: each
    row of x and of the weight contiguous along K."""
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"{kernel} needs unit stride along K")
    return torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype, device=x.device)


@dataclass(frozen=True)
class GemvConfig:
    """A tile of the W8A16 kernel: BLOCK_N weight rows by BLOCK_K columns per step, for one row
    of x per program. BLOCK_N x BLOCK_K fp32 partial sums stay in registers, reduced once at
    the end; the weight moves in 8-byte loads, as wide as x's bf16 loads in the same layout
    (16-byte ones would need x reshuffled through shared memory every step)."""

    block_n: int
    block_k: int
    num_warps: int = 4


GEMV_CONFIGS = (GemvConfig(4, 1024), GemvConfig(8, 512))  # the sweep (benchmarks/fp8_linear.py)
GEMV_CONFIG = GEMV_CONFIGS[0]


@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    # Rows of x vary fastest over the grid: programs sharing a weight tile run together.
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.max_contiguous(tl.arange(0, BLOCK_K), 8)  # 8-byte weight loads (see GemvConfig)
    # Rows past N read row 0 rather than being masked (a mask would split the loads); their
    # results are never stored.
    w_ptrs = w_ptr + tl.where(n_ok, offs_n, 0).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    # x's row broadcast over the tile's rows: loaded in the weight's layout (L1 hits).
    x_ptrs = x_ptr + row * stride_xm + offs_k[None, :] + 0 * offs_n[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            k_ok = (k + offs_k < K)[None, :]
            w = tl.load(w_ptrs, mask=k_ok, other=0.0)
            x = tl.load(x_ptrs, mask=k_ok, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out = tl.sum(acc, 1) * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def w8a16_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, config: GemvConfig = GEMV_CONFIG,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [M, K] @ dequantized weight [N, K] (e4m3, scales [N, 1]) -> [M, N] in out_dtype:
    (x @ weight^T) * scale (+ bias), accumulated in fp32. Every row of x reads the whole weight
    again (from L2 after the first): for M = 1."""
    out = _product_output(x, weight, out_dtype, "w8a16_gemv")
    (m, k), n = x.shape, weight.shape[0]
    if m == 0:
        return out
    pdl = dependent_launch(x.device)
    _w8a16_kernel[(m, triton.cdiv(n, config.block_n))](
        x, weight, weight_scale, x if bias is None else bias, out, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
        HAS_BIAS=bias is not None, PDL=pdl, launch_pdl=pdl, num_warps=config.num_warps,
    )
    return out


@dataclass(frozen=True)
class GemmConfig:
    """A tile of the W8A8 kernel; group_m output row-tiles share their weight tiles in L2.
    split_k > 1 splits K among that many programs per tile (see `w8a8_gemm`)."""

    block_m: int
    block_n: int
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    split_k: int = 1


GEMM_CONFIGS = (  # the sweep (benchmarks/fp8_linear.py)
    GemmConfig(64, 64, num_warps=4, num_stages=4),
    GemmConfig(64, 128, num_warps=4, num_stages=4),
    GemmConfig(128, 128),
    GemmConfig(64, 64, num_warps=4, num_stages=4, split_k=2),
    GemmConfig(64, 128, num_warps=4, num_stages=4, split_k=4),
)
GEMM_CONFIG = GEMM_CONFIGS[0]
# Tiles whose split parts one device can sum at once: the arrival counters allocated for it.
MAX_SPLIT_TILES = 4096
MIN_SPLIT_BLOCKS = 4  # blocks of K each split part sums, at the least


def gemm_config(m: int, n: int, k: int, sms: int) -> GemmConfig:
    """The tile `fp8_linear` launches for x [m, k] @ weight [n, k]^T (m <= 64) on a GPU of `sms`
    multiprocessors: 64 x 64, and K halved again while that keeps the programs within one per
    multiprocessor and each part at least MIN_SPLIT_BLOCKS blocks of K (chosen by an H100
    sweep of 64 or 128 rows, 64 or 128 columns, 1 to 8 parts: docs/benchmarks.md)."""
    tiles = triton.cdiv(m, 64) * triton.cdiv(n, 64)
    k_blocks = triton.cdiv(k, 128)
    split = 1
    while tiles * split * 2 <= sms and k_blocks >= 2 * split * MIN_SPLIT_BLOCKS:
        split *= 2
    return GemmConfig(64, 64, num_warps=4, num_stages=4, split_k=split)


@triton.jit
def _w8a8_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, part_ptr, count_ptr, M, N, K,
    K_PER_SPLIT, stride_am, stride_bn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    # GROUP_M row-tiles run one after another over each column tile: their B tiles hit L2.
    tile = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    first_m = (tile // (GROUP_M * tiles_n)) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % (GROUP_M * tiles_n)) % group_size
    pid_n = (tile % (GROUP_M * tiles_n)) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(1) * K_PER_SPLIT
    offs_k = k_start + tl.arange(0, BLOCK_K)
    # Out-of-range rows wrap (their results are never stored), so loads need no row mask.
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_bn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = (k - k_start + offs_k < K)[None, :]
            a = tl.load(a_ptrs, mask=k_ok, other=0.0)
            b = tl.load(b_ptrs, mask=k_ok, other=0.0)
        # Both operands K-major, as Hopper's FP8 wgmma needs. Fast accumulation (Triton's
        # sm_90 default, as fp8_linear asks of cuBLASLt): the tensor cores keep the sum over
        # all of K in their own accumulator, a few bits short of fp32 (see fp8_linear).
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if SPLIT_K == 1:
        _store_output(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr,
                      stride_cm, HAS_BIAS)
    else:
        # Each program leaves its part in the tile's slot of the workspace; the last of the
        # tile's SPLIT_K programs to arrive adds them up in split order (so the sum does not
        # depend on who came last) and writes the output. The barrier puts all of this
        # program's stores before its (releasing) arrival; the last one's loads bypass L1.
        block = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        parts = part_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N) + block
        tl.store(parts + tl.program_id(1) * (BLOCK_M * BLOCK_N), acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        if arrived == SPLIT_K - 1:
            acc = tl.load(parts, cache_modifier=".cg")
            for s in range(1, SPLIT_K):
                acc += tl.load(parts + s * (BLOCK_M * BLOCK_N), cache_modifier=".cg")
            tl.store(count_ptr + tile, 0)  # ready for the next GEMM
            _store_output(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr,
                          c_ptr, stride_cm, HAS_BIAS)


@triton.jit
def _store_output(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr,
                  stride_cm, HAS_BIAS: tl.constexpr):
    """The epilogue: row and column scales, then the bias, stored in c's dtype."""
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = acc * tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    acc = acc * tl.load(b_scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


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


# The split tiles' arrival counters per device: zeroed once, and each tile's returned to zero
# by the program that completes it.
_split_counters: dict[torch.device, torch.Tensor] = {}


def w8a8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
              weight_scale: torch.Tensor, bias: torch.Tensor | None,
              config: GemmConfig = GEMM_CONFIG,
              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x_q [M, K] (e4m3, scales [M, 1]) @ weight [N, K] (e4m3, scales [N, 1]) -> [M, N]:
    (x_q @ weight^T) * x_scale * weight_scale^T (+ bias), accumulated in fp32.

    With config.split_k > 1, K is cut into that many ranges of whole blocks, each summed by its
    own program: a few tiles (decode's row counts against a narrow weight) then still keep
    every multiprocessor reading weight. The parts meet in an fp32 workspace and are added in
    a fixed order: results are the same run to run."""
    out = _product_output(x_q, weight, out_dtype, "w8a8_gemm")
    (m, k), n = x_q.shape, weight.shape[0]
    if m == 0:
        return out
    c = config
    tiles = triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n)
    k_per_split = triton.cdiv(triton.cdiv(k, c.block_k), c.split_k) * c.block_k
    split = triton.cdiv(k, k_per_split) if tiles <= MAX_SPLIT_TILES else 1
    parts = counters = out
    if split > 1:
        counters = buffer_before_capture(_split_counters, x_q.device, lambda: torch.zeros(
            MAX_SPLIT_TILES, dtype=torch.int32, device=x_q.device))
        parts = torch.empty(tiles * split * c.block_m * c.block_n, dtype=torch.float32,
                            device=x_q.device)
    else:
        k_per_split = k
    pdl = dependent_launch(x_q.device)
    _w8a8_kernel[(tiles, split)](
        x_q, weight, x_scale, weight_scale, x_scale if bias is None else bias, out, parts,
        counters, m, n, k, k_per_split, x_q.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
        SPLIT_K=split, EVEN_K=k % c.block_k == 0, HAS_BIAS=bias is not None, PDL=pdl,
        launch_pdl=pdl, num_warps=c.num_warps, num_stages=c.num_stages,
    )
    return out
