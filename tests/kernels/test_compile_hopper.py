"""Every Triton kernel compiles for Hopper (sm_90), checked on any machine, GPU or not.

The interpreter runs the kernels' arithmetic but not Triton's compiler, which rejects things the
interpreter accepts (types that change across loop iterations, layouts, shared-memory limits).
Triton ships ptxas, so compiling ahead of time needs no GPU. It runs in a subprocess because
kernels decorated in this process may be interpreted ones.
"""

from collections.abc import Callable

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from llmserve.kernels import (
    activation, fp8_gemm, paged_decode, paged_decode_fp8, paged_extend, qkv_rope_store,
    rms_norm,
)

# The attention kernels read an e4m3 cache's bfloat16 scales as 32-bit words (ks_ptr, vs_ptr);
# the store writes them (k_scales_ptr, v_scales_ptr: bf16, the default).
INT_POINTERS = {"seq_lens_ptr", "tables_ptr", "starts_ptr", "slots_ptr", "positions_ptr",
                "order_ptr", "ks_ptr", "vs_ptr"}
FP32_POINTERS = {"part_out_ptr", "part_lse_ptr", "cos_sin_ptr", "scale_ptr", "x_row_scale_ptr",
                 "x_col_scale_ptr", "row_scale_ptr", "col_scale_ptr", "amax_ptr"}
CACHE_POINTERS = {"k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr"}


def compile_sm90(fn, constants, dtype="bf16", num_warps=4, num_stages=2, cache="bf16",
                 e4m3=(), gluon=False):
    # Every kernel as the GPU runs it: launched with programmatic dependent launch.
    constants = {**constants, "PDL": True}
    if gluon:  # a Gluon kernel takes its warps as a parameter too
        constants["num_warps"] = num_warps

    def arg_type(name):
        if name in constants:
            return "constexpr"
        if name in INT_POINTERS:
            return "*i32"
        if name in FP32_POINTERS:
            return "*fp32"
        if name in CACHE_POINTERS:
            return "*" + cache
        if name in e4m3:
            return "*fp8e4nv"
        if name.endswith("_ptr"):
            return "*" + dtype
        return "fp32" if name in ("qk_scale", "eps") else "i32"

    signature = {name: arg_type(name) for name in fn.arg_names}
    # What the launcher would know at run time: 16-divisible strides and aligned pointers.
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if name not in constants
               and name.startswith(("stride", "q_", "k_", "v_", "out_", "qkv_"))}
    source = (GluonASTSource if gluon else ASTSource)(fn, signature, constants, aligned)
    triton.compile(source, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps, "num_stages": num_stages})


attention = dict(GROUP=2, HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64, PRECISION="tf32", UPCAST=False)
# The bf16 cache, and the e4m3 one with its scales.
for cache, fp8 in [("bf16", False), ("fp8e4nv", True)]:
    for page, splits in [(16, 1), (64, 4)]:
        compile_sm90(paged_decode._decode_split_kernel, dict(
            attention, BLOCK_H=16, PAGE_SIZE=page, NUM_SPLITS=splits, MIN_SPLIT=64, FP8=fp8,
            FP16=fp8, ORDERED=splits == 1),
            cache=cache)
    compile_sm90(paged_decode._decode_split_kernel, dict(
        attention, BLOCK_H=16, PAGE_SIZE=16, NUM_SPLITS=2, MIN_SPLIT=32, BLOCK_N=32, FP8=fp8,
        FP16=fp8, ORDERED=False),
        num_stages=5, cache=cache)
    compile_sm90(paged_extend._extend_kernel, dict(
        attention, BLOCK_M=64, BLOCK_Q=32, PAGE_SIZE=16, FP8=fp8, FP16=fp8), cache=cache)
    for norm in (True, False):
        compile_sm90(qkv_rope_store._qkv_rope_store_kernel, dict(
            NUM_Q_HEADS=16, NUM_KV_HEADS=8, HEAD_DIM=128, HALF=64, Q_PART_HEADS=8, BLOCK_KH=8,
            BLOCK_HALF=64, BLOCK_D=128, PAGE_SIZE=16, NORM=norm, FP8=fp8, ROUND_BY_HAND=False,
            SCALE_X=norm), cache=cache)
# The Gluon e4m3 decode kernel: each head dim, pages longer and shorter than a tile, splits,
# FP8_BANDS's 128-key tiles.
for dim, page, block_n, warps, stages, splits in [
        (128, 128, 64, 2, 2, 1), (128, 128, 128, 4, 2, 2), (128, 16, 64, 4, 3, 2),
        (32, 16, 32, 2, 3, 1), (64, 64, 64, 4, 2, 2), (256, 128, 32, 4, 2, 1)]:
    compile_sm90(paged_decode_fp8.decode_fp8_kernel, dict(
        GROUP=2, BLOCK_H=16, HEAD_DIM=dim, BLOCK_N=block_n, PAGE_SIZE=page, NUM_SPLITS=splits,
        MIN_SPLIT=block_n, STAGES=stages, ORDERED=splits == 1),
        num_warps=warps, cache="fp8e4nv", gluon=True)
compile_sm90(paged_decode._decode_reduce_kernel, dict(
    HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64, NUM_SPLITS=4, MIN_SPLIT=256, BLOCK_S=4))
for quantize in (False, True):
    for scale_x in (False, True):
        compile_sm90(rms_norm._rms_norm_kernel, dict(
            HIDDEN=1024, BLOCK=1024, ADD_RESIDUAL=True, SCALE_X=scale_x, QUANTIZE=quantize),
            num_warps=4, e4m3=("out_ptr",) if quantize else ())
compile_sm90(activation._silu_and_mul_kernel, dict(BLOCK=1024))
for scale_x in (False, True):
    for one_block in (False, True):
        compile_sm90(activation._silu_and_mul_fp8_kernel, dict(
            BLOCK=4096, ONE_BLOCK=one_block, SCALE_X=scale_x), num_warps=8, e4m3=("q_ptr",))
    compile_sm90(activation._silu_and_mul_chunk_kernel, dict(BLOCK=1024, SCALE_X=scale_x))
compile_sm90(activation._round_chunk_kernel, dict(BLOCK=1024, CHUNKS=16), e4m3=("q_ptr",))
for warps in (4, 16):
    compile_sm90(fp8_gemm._quantize_rows_kernel, dict(BLOCK=4096, ONE_BLOCK=True),
                 num_warps=warps, e4m3=("q_ptr",))
print("compiled")
"""


def test_kernels_compile_for_sm90(compile_for_sm90: Callable[[str], None]) -> None:
    compile_for_sm90(SCRIPT)
