"""K1 `decode-step` (docs/benchmarks.md): the decode attention kernel alone.

One layer of W1 at mid-decode: 256 sequences, context len(prompt) + max_tokens // 2 from W1's
draws, one query token each, Qwen3-0.6B shape (16 query heads, 8 KV heads, head_dim 128, bf16),
KV pages scattered at random over the pool. Times our Triton `paged_decode_attention` (split
kernel and reduction) over a sweep of page sizes, split counts and tile shapes, and flash-attn 4's
paged `flash_attn_varlen_func` at its page sizes, each the median of >= 40 CUDA-event-timed runs
alternating two input sets; measures device-to-device copy bandwidth in the same run.

    python benchmarks/kernels.py                      # on a CUDA device
    python benchmarks/kernels.py --device cpu --small # smoke run in Triton's interpreter
"""

import argparse
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from random import randint, seed
from typing import Any

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
    }


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
        choose_num_splits,
        paged_decode_attention,
    )

    cuda = args.device == "cuda"
    contexts = w1_contexts()
    heads, dim = NUM_KV_HEADS, HEAD_DIM
    page_sizes, splits, tiles_list, runs = PAGE_SIZES, SPLITS, TILES, args.runs
    if args.small:  # interpreter-sized: a few short sequences, one page size
        contexts = [c % 61 + 1 for c in contexts[:4]]
        heads, dim, page_sizes, splits, tiles_list = 2, 32, [16], [1, 3, None], TILES[:2]
        runs = 2
    kv_bytes = sum(contexts) * heads * dim * 2 * 2
    scale = dim**-0.5
    device_name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    copy_bps = copy_bandwidth(args.device, (2 << 30) if cuda else (64 << 20), runs)
    results: list[dict] = []
    twin_errors: dict[int, float] = {}  # page size -> norm-wise error of ours vs the torch twin
    fa4, fa4_status = fa4_function() if cuda else (None, "unavailable (no CUDA device)")

    def record(impl: str, page: int, config: dict, us: float, **extra: Any) -> None:
        tbps = kv_bytes / (us * 1e-6) / 1e12
        results.append(
            {
                "impl": impl,
                "page_size": page,
                **config,
                "median_us": round(us, 2),
                "tb_per_s": round(tbps, 4),
                "fraction_of_copy": round(tbps * 1e12 / copy_bps, 4),
                **extra,
            }
        )

    def ours(pool: dict, num_splits: int | None, tiles: DecodeTiles) -> torch.Tensor:
        return paged_decode_attention(
            pool["q"],
            pool["k"],
            pool["v"],
            pool["lens"],
            pool["tables"],
            scale,
            num_splits=num_splits,
            tiles=tiles,
        )

    def sweep_page(
        page: int, configs: list[tuple[int | None, DecodeTiles]], with_fa4: bool
    ) -> None:
        pools = [kv_pool(contexts, page, heads, dim, args.device) for _ in range(2)]
        # Every page size's answer is checked against the torch twin before it is timed.
        p = pools[0]
        starts = torch.arange(len(contexts) + 1, dtype=torch.int32, device=args.device)
        ref = paged_attention_torch(
            p["q"], p["k"], p["v"], starts, p["lens"], p["tables"], scale
        ).float()
        err = float((ours(p, None, DecodeTiles()).float() - ref).norm() / ref.norm())
        assert err < 1e-2, f"triton decode differs from the twin at page {page}: {err:.3g}"
        auto, _ = choose_num_splits(
            len(contexts), heads, p["tables"].shape[1] * page, sm_count(p["q"].device)
        )
        for num_splits, tiles in configs:
            us = median_us(tuple(partial(ours, p, num_splits, tiles) for p in pools), runs, cuda)
            split_info = (
                {"num_splits": num_splits}
                if num_splits is not None
                else {"num_splits": "auto", "auto_num_splits": auto}
            )
            record("triton", page, {**split_info, "tiles": asdict(tiles)}, us)
        twin_errors[page] = round(err, 5)
        if with_fa4 and fa4 is not None and page in FA4_PAGE_SIZES:
            sweep_fa4(page, pools)

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
                mine = ours(pools[0], None, DecodeTiles()).float()
                err = float((theirs - mine).norm() / theirs.norm())
                us = median_us(tuple(partial(call, p, num_splits) for p in pools), runs, cuda)
            except Exception as exc:  # a page size or split setting this build rejects
                results.append(
                    {
                        "impl": "flash_attn_4",
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

    for page in page_sizes:
        sweep_page(page, [(s, DecodeTiles()) for s in splits], with_fa4=True)
        if cuda:
            torch.cuda.empty_cache()
    best_split = min((r for r in results if r["impl"] == "triton"), key=lambda r: r["median_us"])
    best_splits = None if best_split["num_splits"] == "auto" else best_split["num_splits"]
    # Tile shapes only at the best page size and split count, to keep compile time in bounds.
    more_tiles = [DecodeTiles(*t) for t in tiles_list if DecodeTiles(*t) != DecodeTiles()]
    sweep_page(best_split["page_size"], [(best_splits, t) for t in more_tiles], with_fa4=False)

    def best(impl: str) -> dict | str:
        timed = [r for r in results if r["impl"] == impl and "median_us" in r]
        if timed:
            return min(timed, key=lambda r: r["median_us"])
        return fa4_status if impl == "flash_attn_4" else "unavailable"

    best_ours, best_fa4 = best("triton"), best("flash_attn_4")
    return {
        "workload": "K1",
        "parameters": {
            "batch": len(contexts),
            "num_heads": heads * NUM_HEADS // NUM_KV_HEADS,
            "num_kv_heads": heads,
            "head_dim": dim,
            "dtype": "bfloat16",
            "sum_context": sum(contexts),
            "runs_per_config": runs,
            "small": args.small,
            "pages": "scattered at random over the pool",
            "alternating_input_sets": 2,
        },
        "device": device_name,
        "commit": commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "kv_bytes": kv_bytes,
        "copy_bandwidth_tb_per_s": round(copy_bps / 1e12, 4),
        "triton_rel_err_vs_twin_by_page": twin_errors,
        "best_triton": best_ours,
        "best_flash_attn_4": best_fa4,
        "triton_speedup_over_flash_attn_4": (
            round(best_fa4["median_us"] / best_ours["median_us"], 3)
            if isinstance(best_fa4, dict)
            else None
        ),
        "configs": results,
    }


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

    return (
        f"K1 on {result['device']} @ {result['commit']}: copy "
        f"{result['copy_bandwidth_tb_per_s']:.3f} TB/s; "
        f"triton {describe(result['best_triton'])}; "
        f"flash-attn 4 {describe(result['best_flash_attn_4'])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (for --device cpu)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per config (>= 40)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.device == "cpu":
        if not args.small:
            parser.error("--device cpu runs in Triton's interpreter: add --small")
        # Before llmserve.kernels (and so triton's decorators) is imported.
        os.environ["LLMSERVE_TRITON_ON_CPU"] = "1"
        os.environ["TRITON_INTERPRET"] = "1"
    elif args.runs < 40:
        parser.error("K1 takes the median of at least 40 runs")
    result = run(args)
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"k1-{slug}-{result['commit']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
