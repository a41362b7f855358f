"""K1 `decode-step` (docs/benchmarks.md): the decode attention kernel alone.

One layer of W1 at mid-decode: 256 sequences, context len(prompt) + max_tokens // 2 from W1's
draws, one query token each, Qwen3-0.6B shape (16 query heads, 8 KV heads, head_dim 128, bf16),
KV pages scattered at random over the pool, programs started longest row first as the engine
orders them (an order built once per step, like the block tables). Times our Triton
`paged_decode_attention` (split kernel and reduction) over a sweep of page sizes, split counts
and tile shapes, and flash-attn 4's paged `flash_attn_varlen_func` at its page sizes, each the
median of >= 40 CUDA-event-timed runs alternating two input sets; measures device-to-device
copy bandwidth in the same run.

`--kv-cache-dtype fp8_e4m3` times the engine's FP8 KV cache instead (e4m3 pages and bfloat16 scales
per (token, KV head), quantized from the same random bf16 values by fp8_kv's quantizer), `both`
times bf16 and FP8 side by side, config by config, and reports FP8's time over bf16's. Bandwidth
counts the bytes the kernel actually reads: K and V in their cache dtype, and FP8's scales
(`parameters.bytes_read` has the formula). Every config's output is checked once against the
torch twin of its own dtype (and FP8's also against the bf16 answer); a config off by more than
the tolerance is recorded but never the best.

`--sweep-tiles` instead times, at one page size (`--page-size`, 128 as W1 runs), the unsplit
kernel (num_splits=1, what the engine picks at batch 256) over a grid of tile shapes, and splits
of 2, 3 and 4 with the default tiles; configs Triton cannot compile are recorded with the error.

    python benchmarks/kernels.py                      # on a CUDA device
    python benchmarks/kernels.py --kv-cache-dtype both
    python benchmarks/kernels.py --kv-cache-dtype both --sweep-tiles
    python benchmarks/kernels.py --device cpu --small # smoke run in Triton's interpreter
"""

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from itertools import product
from pathlib import Path
from random import randint, seed
from typing import Any

from cpu_interpreter import use_interpreter_on_cpu
from result_file import commit

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128
PAGE_SIZES = [16, 32, 64, 128, 256]
SPLITS: list[int | None] = [1, 2, 4, 8, None]
# (block_n, num_warps, num_stages); Triton 3.x double-buffers these K/V tiles only from about
# 5 stages on (fewer give one buffer refilled after each tile), so both kinds are swept.
TILES = [
    (64, 4, 2),
    (32, 4, 2),
    (32, 4, 5),
    (64, 4, 5),
    (64, 8, 5),
    (32, 2, 5),
    (128, 8, 2),
    (16, 4, 6),
]
FA4_PAGE_SIZES = [16, 64, 128, 256]
FA4_SPLITS = [1, 0]  # 0: flash-attn's own heuristic
# --sweep-tiles: the unsplit kernel over every (block_n, num_warps, num_stages) here, then these
# split counts with the default tiles.
SWEEP_TILES: list[tuple[int, ...]] = list(product((64, 128, 256), (2, 4, 8), (2, 3, 4, 5)))
# ... and under register caps (the fourth number, maxnreg): each compiles for sm_90 without
# spilling and fits more warps an SM than it would uncapped (docs/benchmarks.md has what the
# FP8 kernel made of them).
SWEEP_TILES += [(32, 2, 5, 128), (32, 4, 5, 72), (32, 4, 5, 96), (64, 4, 5, 96), (64, 4, 6, 96),
                (64, 8, 5, 80), (128, 8, 3, 128)]
SWEEP_SPLITS = [2, 3, 4]
SWEEP_PAGE_SIZE = 128  # W1's KV page (throughput.py --block-size)

# --kv-cache-dtype: which caches are timed ("auto" is the engine's: the model's bf16).
KV_CACHE_DTYPES = {
    "auto": ["bfloat16"],
    "fp8_e4m3": ["fp8_e4m3"],
    "both": ["bfloat16", "fp8_e4m3"],
}
# Bytes per (token, KV head) row of K or of V that the kernel reads, and how they are counted.
# q, the output, the block tables and seq_lens (under 0.5 % at K1's size) are not counted.
ROW_BYTES = {"bfloat16": lambda dim: dim * 2, "fp8_e4m3": lambda dim: dim * 1 + 2}
BYTES_READ = {
    "bfloat16": "sum(context) x num_kv_heads x head_dim x 2 bytes x 2 (K and V)",
    "fp8_e4m3": "sum(context) x num_kv_heads x head_dim x 1 byte x 2 (K and V) "
    "+ sum(context) x num_kv_heads x 2 bytes x 2 (K's and V's bfloat16 scales)",
}
# A config whose output is further than this from the torch twin of its dtype (as
# tests/kernels/test_paged_decode.py bounds it), or an FP8 one further than FP8_VS_BF16 from
# the bf16 answer, is recorded but never the best.
TWIN_TOLERANCE = {"bfloat16": 1e-2, "fp8_e4m3": 2e-2}
FP8_VS_BF16 = 0.1


def w1_contexts() -> list[int]:
    """K1's contexts from W1's draws, checked against the workload's published sums."""
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(100, 1024))] for _ in range(256)]
    max_tokens = [randint(100, 1024) for _ in range(256)]
    assert sum(max_tokens) == 133966
    contexts = [len(p) + m // 2 for p, m in zip(prompts, max_tokens, strict=True)]
    assert sum(contexts) == 209_740
    return contexts


def median_us(fns: tuple[Callable[[], Any], Callable[[], Any]], runs: int, cuda: bool) -> float:
    """Median time of `runs` calls alternating the two closures, after an untimed warm-up."""
    import torch

    for fn in fns * 2:
        fn()
    if not cuda:
        times = []
        for i in range(runs):
            start = time.perf_counter()
            fns[i % 2]()
            times.append((time.perf_counter() - start) * 1e6)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(runs)
    ]
    for i, (start, end) in enumerate(events):
        start.record()
        fns[i % 2]()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) * 1e3 for start, end in events)


def copy_bandwidth(device: str, nbytes: int, runs: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the bytes read and written."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = median_us((lambda: dst.copy_(src), lambda: src.copy_(dst)), runs, device == "cuda")
    return 2 * nbytes / (us * 1e-6)


def kv_pool(contexts: list[int], page: int, heads: int, dim: int, device: str) -> dict:
    """A bf16 K/V pool with every sequence's pages at random places, and a query batch."""
    import torch

    pages = [-(-c // page) for c in contexts]
    num_blocks = sum(pages) + 16
    order = torch.randperm(num_blocks, device=device).to(torch.int32)
    tables = torch.zeros(len(contexts), max(pages), dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(pages):
        tables[b, :n] = order[used : used + n]
        used += n
    shape = (num_blocks, page, heads, dim)
    return {
        "q": torch.randn(
            len(contexts),
            heads * NUM_HEADS // NUM_KV_HEADS,
            dim,
            device=device,
            dtype=torch.bfloat16,
        ),
        "k": torch.randn(shape, device=device, dtype=torch.bfloat16),
        "v": torch.randn(shape, device=device, dtype=torch.bfloat16),
        "tables": tables,
        "lens": torch.tensor(contexts, dtype=torch.int32, device=device),
        # The engine's decode order (longest first), built once per step with the tables.
        "order": torch.argsort(torch.tensor(contexts), descending=True, stable=True)
        .to(device=device, dtype=torch.int32),
    }


def fp8_pool(pool: dict) -> dict:
    """The pool's K/V values as the engine's FP8 cache (kv_cache.quantize_pages: e4m3 pages
    stored head by head inside a page, bfloat16 scales per row [num_blocks, Hkv, block_size])."""
    from llmserve.engine_service.attention import kv_cache

    cache = kv_cache.quantize_pages(pool["k"], pool["v"])
    return {**pool, "k": cache.k, "v": cache.v, "scales": cache.scales}


def fa4_function() -> tuple[Callable[..., Any] | None, str]:
    """flash-attn 4's varlen function, or None and why it cannot be had."""
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception as exc:  # any import failure means "unavailable", reported with its reason
        return None, f"unavailable ({exc!r:.200})"
    return flash_attn_varlen_func, "available"


def run(args: argparse.Namespace) -> dict:
    import torch
    import triton

    from llmserve.kernels.paged_attention import paged_attention_torch
    from llmserve.kernels.paged_common import sm_count
    from llmserve.kernels.paged_decode import (
        DecodeTiles,
        paged_decode_attention,
        resolve_launch,
    )

    cuda = args.device == "cuda"
    began = time.perf_counter()
    contexts = w1_contexts()
    heads, dim = NUM_KV_HEADS, HEAD_DIM
    page_sizes, splits, tiles_list, runs = PAGE_SIZES, SPLITS, TILES, args.runs
    sweep_page_size, sweep_tiles, sweep_splits = args.page_size, SWEEP_TILES, SWEEP_SPLITS
    if args.small:  # interpreter-sized: a few short sequences, one page size
        contexts = [c % 61 + 1 for c in contexts[:4]]
        heads, dim, page_sizes, splits, tiles_list = 2, 32, [16], [1, 3, None], TILES[:2]
        sweep_page_size, sweep_tiles, sweep_splits = 16, [(16, 4, 2), (32, 4, 2, 96)], [2]
        runs = 2
    dtypes = KV_CACHE_DTYPES[args.kv_cache_dtype]
    kv_bytes = {d: sum(contexts) * heads * ROW_BYTES[d](dim) * 2 for d in dtypes}
    scale = dim**-0.5
    device_name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    copy_bps = copy_bandwidth(args.device, (2 << 30) if cuda else (64 << 20), runs)
    results: list[dict] = []
    # dtype -> page size -> norm-wise error of the default config vs the twin of its dtype
    twin_errors: dict[str, dict[int, float]] = {d: {} for d in dtypes}
    fp8_vs_bf16_errors: dict[int, float] = {}  # page size -> FP8's default config vs bf16 twin
    fa4, fa4_status = fa4_function() if cuda else (None, "unavailable (no CUDA device)")
    if args.sweep_tiles:
        fa4, fa4_status = None, "not run (--sweep-tiles)"
    elif "bfloat16" not in dtypes:
        fa4, fa4_status = None, "not run (no bf16 cache in this run)"

    def progress(row: dict) -> None:
        tiles = row.get("tiles")
        shape = (
            f" tiles {'/'.join(str(v) for v in tiles.values() if v is not None)}" if tiles else ""
        )
        figures = (
            f"{row['median_us']:.1f} us, {row['tb_per_s']:.3f} TB/s "
            f"= {row['fraction_of_copy']:.1%} of copy"
            if "median_us" in row
            else f"error {row['error'][:120]}"
        )
        errs = ", ".join(f"{k} {v:.2g}" for k, v in row.items() if k.startswith("rel_err"))
        print(
            f"[{time.perf_counter() - began:6.1f} s] {row['impl']} "
            f"{row.get('kv_cache_dtype', 'bfloat16')} page {row['page_size']} "
            f"splits {row['num_splits']}{shape}: {figures}" + (f" ({errs})" if errs else ""),
            flush=True,
        )

    def record(
        impl: str, page: int, config: dict, us: float, dtype: str = "bfloat16", **extra: Any
    ) -> dict:
        tbps = kv_bytes[dtype] / (us * 1e-6) / 1e12
        row = {
            "impl": impl,
            "kv_cache_dtype": dtype,
            "page_size": page,
            **config,
            "median_us": round(us, 2),
            "tb_per_s": round(tbps, 4),
            "fraction_of_copy": round(tbps * 1e12 / copy_bps, 4),
            **extra,
        }
        results.append(row)
        progress(row)
        return row

    def ours(pool: dict, num_splits: int | None, tiles: DecodeTiles | None) -> torch.Tensor:
        return paged_decode_attention(
            pool["q"],
            pool["k"],
            pool["v"],
            pool["lens"],
            pool["tables"],
            scale,
            num_splits=num_splits,
            tiles=tiles,
            kv_scales=pool.get("scales"),
            order=pool["order"],
        )

    def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
        return float((out.float() - ref).norm() / ref.norm())

    def engine_launch(
        page: int, dtype: str, num_splits: int | None, tiles: DecodeTiles | None
    ) -> tuple[int, int, DecodeTiles]:
        """(splits, fewest keys per split, tiles) the kernel launches with, as the engine
        resolves what is left open, for K1's batch over `page`-token pages."""
        max_pages = max(-(-c // page) for c in contexts)
        return resolve_launch(
            len(contexts),
            heads,
            max_pages * page,
            sm_count(torch.device(args.device)),
            dtype == "fp8_e4m3",
            num_splits,
            tiles,
        )

    def sweep_page(
        page: int,
        configs: dict[str, list[tuple[int | None, DecodeTiles | None]]],
        with_fa4: bool,
        check: bool = True,
    ) -> None:
        """Times `configs[dtype]` for each dtype at one page size, config by config (both dtypes
        of a config back to back); `check` asserts the engine's choice matches the twin. Tiles
        None are the engine's for the split count (its choice with the count None too)."""
        bf16_pools = [kv_pool(contexts, page, heads, dim, args.device) for _ in range(2)]
        pools = {"bfloat16": bf16_pools}
        if "fp8_e4m3" in configs:
            pools["fp8_e4m3"] = [fp8_pool(p) for p in bf16_pools]
        starts = torch.arange(len(contexts) + 1, dtype=torch.int32, device=args.device)
        # The twin's answer for each timed dtype (bf16's is also FP8's "right" answer).
        refs = {}
        for dtype in ["bfloat16", *configs]:
            p = pools[dtype][0]
            if dtype not in refs:
                refs[dtype] = paged_attention_torch(
                    p["q"],
                    p["k"],
                    p["v"],
                    starts,
                    p["lens"],
                    p["tables"],
                    scale,
                    kv_scales=p.get("scales"),
                ).float()
        # Every page size's answer is checked against the torch twin before it is timed.
        for dtype in configs:
            out = ours(pools[dtype][0], None, None)
            err = rel_err(out, refs[dtype])
            if check:
                assert err < TWIN_TOLERANCE[dtype], (
                    f"triton decode ({dtype}) differs from the twin at page {page}: {err:.3g}"
                )
            twin_errors[dtype][page] = round(err, 5)
            if dtype == "fp8_e4m3":
                fp8_vs_bf16_errors[page] = round(rel_err(out, refs["bfloat16"]), 5)
        ordered = list(
            dict.fromkeys(c for dtype_configs in configs.values() for c in dtype_configs)
        )
        for num_splits, tiles in ordered:
            bf16_us = None
            for dtype in [d for d in configs if (num_splits, tiles) in configs[d]]:
                launch = engine_launch(page, dtype, num_splits, tiles)
                split_info = (
                    {"num_splits": num_splits}
                    if num_splits is not None
                    else {"num_splits": "auto", "auto_num_splits": launch[0]}
                )
                config = {**split_info, "tiles": asdict(launch[2])}
                row = time_config(dtype, page, config, pools[dtype], refs, num_splits, tiles)
                if dtype == "bfloat16" and "median_us" in row:
                    bf16_us = row["median_us"]
                elif dtype == "fp8_e4m3" and "median_us" in row and bf16_us:
                    row["time_ratio_vs_bf16"] = round(row["median_us"] / bf16_us, 4)
                    print(f"    fp8 time / bf16 time {row['time_ratio_vs_bf16']}", flush=True)
        if with_fa4 and fa4 is not None and page in FA4_PAGE_SIZES:
            sweep_fa4(page, bf16_pools)

    def time_config(
        dtype: str,
        page: int,
        config: dict,
        dtype_pools: list[dict],
        refs: dict,
        num_splits: int | None,
        tiles: DecodeTiles | None,
    ) -> dict:
        """One config: its first call (Triton compiles it there) checked against the twin,
        then timed; a config that fails to compile or run is recorded with its error."""
        try:
            first = time.perf_counter()
            out = ours(dtype_pools[0], num_splits, tiles)
            if cuda:
                torch.cuda.synchronize()
            first_s = time.perf_counter() - first
            errs = {"rel_err_vs_twin": round(rel_err(out, refs[dtype]), 5)}
            if dtype == "fp8_e4m3":
                errs["rel_err_vs_bf16"] = round(rel_err(out, refs["bfloat16"]), 5)
            ok = errs["rel_err_vs_twin"] < TWIN_TOLERANCE[dtype] and (
                errs.get("rel_err_vs_bf16", 0.0) < FP8_VS_BF16
            )
            us = median_us(
                tuple(partial(ours, p, num_splits, tiles) for p in dtype_pools), runs, cuda
            )
        except Exception as exc:  # e.g. Triton's OutOfResources (shared memory) for big tiles
            row = {
                "impl": "triton",
                "kv_cache_dtype": dtype,
                "page_size": page,
                **config,
                "error": repr(exc)[:300],
            }
            results.append(row)
            progress(row)
            return row
        return record(
            "triton", page, config, us, dtype, **errs, ok=ok, first_call_s=round(first_s, 3)
        )

    def sweep_fa4(page: int, pools: list[dict]) -> None:
        starts = torch.arange(len(contexts) + 1, dtype=torch.int32, device=args.device)

        def call(pool: dict, num_splits: int) -> torch.Tensor:
            out = fa4(
                pool["q"],
                pool["k"],
                pool["v"],
                cu_seqlens_q=starts,
                max_seqlen_q=1,
                seqused_k=pool["lens"],
                page_table=pool["tables"],
                softmax_scale=scale,
                causal=True,
                num_splits=num_splits,
            )
            return out[0] if isinstance(out, tuple) else out

        for num_splits in FA4_SPLITS:
            try:
                theirs = call(pools[0], num_splits).float()
                mine = ours(pools[0], None, None).float()
                err = float((theirs - mine).norm() / theirs.norm())
                us = median_us(tuple(partial(call, p, num_splits) for p in pools), runs, cuda)
            except Exception as exc:  # a page size or split setting this build rejects
                results.append(
                    {
                        "impl": "flash_attn_4",
                        "kv_cache_dtype": "bfloat16",
                        "page_size": page,
                        "num_splits": num_splits,
                        "error": repr(exc)[:300],
                    }
                )
                continue
            record(
                "flash_attn_4",
                page,
                {"num_splits": num_splits},
                us,
                rel_err_vs_triton=round(err, 5),
            )

    def best(impl: str, dtype: str = "bfloat16") -> dict | str:
        timed = [
            r
            for r in results
            if r["impl"] == impl
            and r.get("kv_cache_dtype", "bfloat16") == dtype
            and "median_us" in r
            and r.get("ok", True)
        ]
        if timed:
            return min(timed, key=lambda r: r["median_us"])
        return fa4_status if impl == "flash_attn_4" else "unavailable"

    engine_choice = None
    if args.sweep_tiles:
        configs = [(1, DecodeTiles(*t)) for t in sweep_tiles]
        configs += [(s, DecodeTiles()) for s in sweep_splits]
        sweep_page(sweep_page_size, {d: configs for d in dtypes}, with_fa4=False, check=False)
        # What the engine runs here (no split count, no tiles given); its row is the grid's.
        engine_choice = {}
        for dtype in dtypes:
            engine_splits, _, engine_tiles = engine_launch(sweep_page_size, dtype, None, None)
            engine_choice[dtype] = {"num_splits": engine_splits, "tiles": asdict(engine_tiles)}
    else:
        for page in page_sizes:
            sweep_page(
                page, {d: [(s, None) for s in splits] for d in dtypes}, with_fa4=True
            )
            if cuda:
                torch.cuda.empty_cache()
        # Tile shapes only at each dtype's best page size and split count, to keep compile
        # time in bounds.
        more_tiles = [DecodeTiles(*t) for t in tiles_list if DecodeTiles(*t) != DecodeTiles()]
        by_page: dict[int, dict[str, list[tuple[int | None, DecodeTiles]]]] = {}
        for dtype in dtypes:
            best_split = best("triton", dtype)
            if not isinstance(best_split, dict):
                continue
            best_splits = None if best_split["num_splits"] == "auto" else best_split["num_splits"]
            by_page.setdefault(best_split["page_size"], {})[dtype] = [
                (best_splits, t) for t in more_tiles
            ]
        for page, configs_by_dtype in by_page.items():
            sweep_page(page, configs_by_dtype, with_fa4=False)

    per_dtype = {}
    for dtype in dtypes:
        entry: dict[str, Any] = {
            "kv_bytes": kv_bytes[dtype],
            "bytes_read": BYTES_READ[dtype],
            "best_triton": best("triton", dtype),
            "rel_err_vs_twin_by_page": twin_errors[dtype],
        }
        if dtype == "fp8_e4m3":
            entry["rel_err_vs_bf16_by_page"] = fp8_vs_bf16_errors
        if engine_choice is not None:
            entry["engine_choice"] = next(
                (
                    r
                    for r in results
                    if r.get("kv_cache_dtype") == dtype
                    and r["num_splits"] == engine_choice[dtype]["num_splits"]
                    and r.get("tiles") == engine_choice[dtype]["tiles"]
                ),
                "not in the grid",
            )
        entry["failed_configs"] = sum(
            1 for r in results if r.get("kv_cache_dtype") == dtype and "error" in r
        )
        entry["rejected_configs"] = sum(
            1 for r in results if r.get("kv_cache_dtype") == dtype and r.get("ok") is False
        )
        per_dtype[dtype] = entry

    first = dtypes[0]
    best_ours, best_fa4 = best("triton", first), best("flash_attn_4")
    result = {
        "workload": "K1-tiles" if args.sweep_tiles else "K1",
        "parameters": {
            "batch": len(contexts),
            "num_heads": heads * NUM_HEADS // NUM_KV_HEADS,
            "num_kv_heads": heads,
            "head_dim": dim,
            "dtype": "bfloat16",
            "kv_cache_dtype": args.kv_cache_dtype,
            "kv_cache_dtypes": dtypes,
            "bytes_read": {d: BYTES_READ[d] for d in dtypes},
            "sum_context": sum(contexts),
            "runs_per_config": runs,
            "small": args.small,
            "pages": "scattered at random over the pool",
            "alternating_input_sets": 2,
            "twin_tolerance": {d: TWIN_TOLERANCE[d] for d in dtypes},
        },
        "device": device_name,
        "commit": commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        # The first dtype's figures at the top level (bf16's unless the run is FP8 only).
        "kv_bytes": kv_bytes[first],
        "copy_bandwidth_tb_per_s": round(copy_bps / 1e12, 4),
        "triton_rel_err_vs_twin_by_page": twin_errors[first],
        "best_triton": best_ours,
        "best_flash_attn_4": best_fa4,
        "triton_speedup_over_flash_attn_4": (
            round(best_fa4["median_us"] / best_ours["median_us"], 3)
            if isinstance(best_fa4, dict) and isinstance(best_ours, dict)
            else None
        ),
        "by_kv_cache_dtype": per_dtype,
    }
    if "fp8_e4m3" in dtypes:
        result["parameters"]["fp8_kv_cache"] = (
            "e4m3 pages [num_blocks, block_size, Hkv, D] stored head by head inside a page "
            "(the engine's layout) and bfloat16 scales [num_blocks, Hkv, block_size] for K and for "
            "V, from the bf16 pool by fp8_kv.quantize_kv_torch"
        )
        result["parameters"]["fp8_tolerance_vs_bf16"] = FP8_VS_BF16
        # The "triton" rows time paged_decode_attention, which runs the Gluon kernel for an
        # e4m3 cache on the GPU.
        result["parameters"]["fp8_decode_kernel"] = (
            "Gluon (kernels/paged_decode_fp8.py)" if cuda else "Triton, interpreted")
    if args.sweep_tiles:
        result["parameters"].update(
            page_size=sweep_page_size,
            tile_grid=[asdict(DecodeTiles(*t)) for t in sweep_tiles],
            unsplit_num_splits=1,
            split_counts_with_default_tiles=sweep_splits,
            engine_choice=engine_choice,
        )
    if len(dtypes) == 2:
        bf16_best, fp8_best = (
            per_dtype["bfloat16"]["best_triton"],
            per_dtype["fp8_e4m3"]["best_triton"],
        )
        ratios = [r["time_ratio_vs_bf16"] for r in results if "time_ratio_vs_bf16" in r]
        result["fp8_vs_bf16"] = {
            "best_time_ratio": (
                round(fp8_best["median_us"] / bf16_best["median_us"], 4)
                if isinstance(fp8_best, dict) and isinstance(bf16_best, dict)
                else None
            ),
            "ideal_time_ratio": round(kv_bytes["fp8_e4m3"] / kv_bytes["bfloat16"], 4),
            "median_config_time_ratio": round(statistics.median(ratios), 4) if ratios else None,
        }
        if engine_choice is not None:
            rows = [per_dtype[d]["engine_choice"] for d in dtypes]
            result["fp8_vs_bf16"]["engine_choice_time_ratio"] = (
                round(rows[1]["median_us"] / rows[0]["median_us"], 4)
                if all(isinstance(r, dict) and "median_us" in r for r in rows)
                else None
            )
    if args.sweep_tiles:  # for the results table's generic row
        result["figures"] = {
            f"{d}_best_fraction_of_copy": (
                per_dtype[d]["best_triton"]["fraction_of_copy"]
                if isinstance(per_dtype[d]["best_triton"], dict)
                else None
            )
            for d in dtypes
        }
        if "fp8_vs_bf16" in result:
            result["figures"]["fp8_best_time_ratio_vs_bf16"] = result["fp8_vs_bf16"][
                "best_time_ratio"
            ]
        result["figures"]["copy_bandwidth_tb_per_s"] = result["copy_bandwidth_tb_per_s"]
    result["configs"] = results
    return result


def summary(result: dict) -> str:
    def describe(best: dict | str) -> str:
        if isinstance(best, str):
            return best
        tiles = ""
        if "tiles" in best:
            t = best["tiles"]
            tiles = f", tiles {t['block_n']} keys/{t['num_warps']} warps/{t['num_stages']} stages"
        return (
            f"{best['tb_per_s']:.3f} TB/s = {best['fraction_of_copy']:.1%} of copy "
            f"({best['median_us']:.1f} us, page {best['page_size']}, "
            f"splits {best['num_splits']}{tiles})"
        )

    dtypes = result["parameters"].get("kv_cache_dtypes", ["bfloat16"])
    text = (
        f"{result['workload']} on {result['device']} @ {result['commit']}: copy "
        f"{result['copy_bandwidth_tb_per_s']:.3f} TB/s; "
    )
    by_dtype = result.get("by_kv_cache_dtype", {})
    if dtypes == ["bfloat16"]:
        text += f"triton {describe(result['best_triton'])}"
    else:
        text += "; ".join(
            f"triton {d} cache {describe(by_dtype[d]['best_triton'])}" for d in dtypes
        )
    if result["workload"] == "K1":
        text += f"; flash-attn 4 {describe(result['best_flash_attn_4'])}"
    if "fp8_vs_bf16" in result:
        ratios = result["fp8_vs_bf16"]
        text += (
            f"; fp8 time / bf16 time: best {ratios['best_time_ratio']}, config median "
            f"{ratios['median_config_time_ratio']} (bytes {ratios['ideal_time_ratio']})"
        )
        if "engine_choice_time_ratio" in ratios:
            text += f", engine's choice {ratios['engine_choice_time_ratio']}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (for --device cpu)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per config (>= 40)")
    parser.add_argument(
        "--kv-cache-dtype",
        choices=list(KV_CACHE_DTYPES),
        default="auto",
        help="auto: the bf16 cache (as before); fp8_e4m3: the engine's FP8 cache; both: each "
        "config in bf16 and FP8 back to back, with FP8's time over bf16's",
    )
    parser.add_argument(
        "--sweep-tiles",
        action="store_true",
        help="instead of the page-size sweep: the unsplit kernel over a grid of tile shapes "
        f"{SWEEP_TILES[0]}..{SWEEP_TILES[-1]} and splits {SWEEP_SPLITS} with default tiles",
    )
    parser.add_argument(
        "--page-size", type=int, default=SWEEP_PAGE_SIZE, help="KV page size of --sweep-tiles"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    use_interpreter_on_cpu(parser, args)
    if args.device == "cuda" and args.runs < 40:
        parser.error("K1 takes the median of at least 40 runs")
    result = run(args)
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
    tag = {"auto": "", "fp8_e4m3": "-fp8-e4m3", "both": "-bf16-and-fp8-e4m3"}
    name = "k1-tiles" if args.sweep_tiles else "k1"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}{tag[args.kv_cache_dtype]}-{slug}-{result['commit']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
