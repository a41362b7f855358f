"""paged_decode_attention (Triton) against its twin paged_attention_torch, one query per row,
and the torch attention backend's decode path against its varlen one."""

import os

import pytest
import torch

from llmserve.engine_service.attention.backends import TORCH_ATTENTION
from llmserve.engine_service.attention.layer import AttentionMetadata
from llmserve.kernels import paged_decode
from llmserve.kernels.paged_attention import paged_attention_torch
from llmserve.kernels.paged_common import sm_count
from llmserve.kernels.paged_decode import (
    FP8_BANDS,
    DecodeTiles,
    choose_num_splits,
    fp8_band,
    paged_decode_attention,
    resolve_launch,
)

ON_CPU = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the CPU cases run in Triton's interpreter (no CUDA here)",
)
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# With an e4m3 cache both round the probabilities times V's scales (to fp16 for a bf16 q), each
# against its own running maximum, and the bf16 output once more.
FP8_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def cpu(*args, name: str):
    """A case for the interpreter on CPU tensors."""
    return pytest.param(*args, "cpu", id=name, marks=ON_CPU)


def gpu(*args, name: str):
    """A case for the CUDA device (larger, Qwen3-0.6B-shaped)."""
    return pytest.param(*args, "cuda", id=name, marks=ON_GPU)


def boundary_lens(block_size: int) -> list[int]:
    """Odd lengths and lengths at page boundaries and one either side."""
    lens = [1, 3, block_size - 1, block_size, block_size + 1, 2 * block_size + 5, 3 * block_size]
    return sorted({n for n in lens if n > 0})


def check_decode(
    paged,
    lens,
    block_size,
    num_heads,
    num_kv_heads,
    head_dim,
    dtype,
    device,
    num_splits,
    q_view: bool = False,
) -> None:
    kv = paged.pool(lens, block_size, num_kv_heads, head_dim, dtype, device)
    batch = len(lens)
    if q_view:  # a strided view, as the engine's q is a slice of the fused qkv projection
        qkv = torch.randn(batch, num_heads + 2 * num_kv_heads, head_dim, device=device).to(dtype)
        q = qkv[:, :num_heads]
    else:
        q = torch.randn(batch, num_heads, head_dim, device=device).to(dtype)
    scale = head_dim**-0.5
    out = paged_decode_attention(
        q, kv.k_cache, kv.v_cache, kv.seq_lens, kv.block_tables, scale, num_splits=num_splits
    )
    starts = torch.arange(batch + 1, dtype=torch.int32, device=device)
    ref = paged_attention_torch(
        q, kv.k_cache, kv.v_cache, starts, kv.seq_lens, kv.block_tables, scale
    )
    assert out.dtype == dtype and out.shape == q.shape
    assert paged.rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("num_splits", [1, 2, 3, None])
@pytest.mark.parametrize(
    ("block_size", "num_heads", "num_kv_heads", "dtype", "device"),
    [
        cpu(16, 4, 2, torch.float32, name="page16-gqa2-fp32"),
        cpu(1, 4, 4, torch.float32, name="page1-mha-fp32"),
        cpu(64, 8, 2, torch.float32, name="page64-gqa4-fp32"),
        cpu(16, 4, 2, torch.bfloat16, name="page16-gqa2-bf16"),
    ],
)
def test_decode_boundaries_and_splits(
    paged, block_size, num_heads, num_kv_heads, dtype, device, num_splits
) -> None:
    check_decode(
        paged,
        boundary_lens(block_size),
        block_size,
        num_heads,
        num_kv_heads,
        32,
        dtype,
        device,
        num_splits,
    )


@pytest.mark.parametrize(
    (
        "lens",
        "block_size",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "dtype",
        "num_splits",
        "device",
    ),
    [
        cpu([7, 33, 1], 16, 4, 1, 32, torch.float32, 2, name="mqa"),
        cpu([19, 40], 16, 6, 2, 32, torch.float32, 3, name="group3"),
        cpu([17, 64, 5], 16, 4, 2, 48, torch.float32, 1, name="head-dim-48"),
        cpu([65, 9], 32, 4, 2, 32, torch.float16, 2, name="fp16-page32"),
        cpu([300, 2], 256, 4, 2, 32, torch.bfloat16, 4, name="page256-bf16"),
        # Automatic splits: a small batch splits even short sequences, in parts of whole tiles.
        cpu([600, 300, 5], 64, 4, 2, 32, torch.float32, None, name="auto-splits"),
        gpu(
            list(range(1, 4097, 16)), 16, 16, 8, 128, torch.bfloat16, None, name="qwen3-b256-page16"
        ),
        gpu(list(range(4096, 0, -16)), 64, 16, 8, 128, torch.bfloat16, 1, name="qwen3-b256-page64"),
        gpu(
            [4096, 4095, 4097, 1000, 1],
            256,
            16,
            8,
            128,
            torch.bfloat16,
            8,
            name="qwen3-long-page256-split8",
        ),
        gpu([2048, 1, 511, 513, 3333] * 8, 16, 16, 8, 128, torch.float32, None, name="qwen3-fp32"),
        gpu([1024, 17, 4096], 16, 32, 8, 128, torch.bfloat16, 16, name="gqa4-split16"),
        gpu([1024, 17, 4096], 1, 16, 16, 64, torch.float16, 4, name="mha-page1-fp16"),
    ],
)
def test_decode_shapes(
    paged, lens, block_size, num_heads, num_kv_heads, head_dim, dtype, num_splits, device
) -> None:
    check_decode(
        paged, lens, block_size, num_heads, num_kv_heads, head_dim, dtype, device, num_splits
    )


@pytest.mark.parametrize(
    "device", [pytest.param("cpu", marks=ON_CPU), pytest.param("cuda", marks=ON_GPU)]
)
def test_decode_strided_query(paged, device) -> None:
    check_decode(paged, [5, 40, 16], 16, 4, 2, 32, torch.float32, device, 2, q_view=True)


@pytest.mark.parametrize(
    ("lens", "block_size", "dtype", "device"),
    [
        cpu([1, 127, 128, 129, 257, 300], 16, torch.float32, name="page16-fp32"),
        cpu([1, 127, 128, 129, 257, 300], 128, torch.float32, name="page128-fp32"),
        gpu([(37 * i) % 1100 + 1 for i in range(256)], 16, torch.bfloat16, name="b256-page16"),
        gpu([(37 * i) % 1100 + 1 for i in range(256)], 128, torch.bfloat16, name="b256-page128"),
    ],
)
def test_decode_unsplit_batch_runs_wide_tiles(paged, lens, block_size, dtype, device) -> None:
    """A batch that fills the SMs without splitting runs UNSPLIT_TILES (128 keys a tile):
    lengths either side of its tile boundaries."""
    kv_heads, heads, dim = (2, 4, 32) if device == "cpu" else (8, 16, 128)
    assert choose_num_splits(len(lens), kv_heads, 4096, sm_count(torch.device(device)))[0] == 1
    check_decode(paged, lens, block_size, heads, kv_heads, dim, dtype, device, None)


def check_fp8_decode(paged, lens, block_size, num_heads, num_kv_heads, head_dim, device,
                     num_splits=None, tiles=None, order=False, dtype=torch.bfloat16) -> None:
    """paged_decode_attention over an e4m3 cache (on the GPU with a bf16 q, the Gluon kernel)
    against the twin."""
    kv = paged.pool(lens, block_size, num_kv_heads, head_dim, torch.float32, device)
    k8, v8, kv_scales = paged.fp8(kv)
    q = torch.randn(len(lens), num_heads, head_dim, device=device).to(dtype)
    rows = torch.argsort(kv.seq_lens, descending=True).to(torch.int32) if order else None
    out = paged_decode_attention(q, k8, v8, kv.seq_lens, kv.block_tables, head_dim**-0.5,
                                 num_splits=num_splits, tiles=tiles, kv_scales=kv_scales,
                                 order=rows)
    starts = torch.arange(len(lens) + 1, dtype=torch.int32, device=device)
    ref = paged_attention_torch(q, k8, v8, starts, kv.seq_lens, kv.block_tables,
                                head_dim**-0.5, kv_scales)
    assert out.dtype == dtype and paged.rel_err(out, ref) < FP8_TOLERANCE[dtype]


@pytest.mark.parametrize(
    ("lens", "block_size", "num_heads", "num_kv_heads", "head_dim", "dtype", "num_splits",
     "device"),
    [
        cpu([1, 15, 16, 17, 70], 16, 4, 2, 32, torch.float32, 2, name="fp8-page16-gqa2-fp32"),
        cpu([33, 5], 64, 4, 1, 32, torch.bfloat16, 1, name="fp8-page64-mqa-bf16"),
        gpu(list(range(1, 4097, 64)), 16, 16, 8, 128, torch.bfloat16, None,
            name="fp8-qwen3-b64-page16"),
        gpu([4096, 1, 1000], 64, 16, 8, 128, torch.bfloat16, 8, name="fp8-qwen3-split8"),
        gpu([(37 * i) % 1100 + 1 for i in range(256)], 16, 16, 8, 128, torch.bfloat16, None,
            name="fp8-qwen3-b256-unsplit"),
        gpu([2048, 17], 16, 16, 8, 128, torch.float32, 2, name="fp8-qwen3-fp32"),
    ],
)
def test_decode_fp8_cache_matches_twin(
    paged, lens, block_size, num_heads, num_kv_heads, head_dim, dtype, num_splits, device
) -> None:
    """An e4m3 cache with per-row scales: the kernel dequantizes as the twin does."""
    check_fp8_decode(paged, lens, block_size, num_heads, num_kv_heads, head_dim, device,
                     num_splits, dtype=dtype)


@pytest.mark.parametrize("band", range(len(FP8_BANDS)))
@pytest.mark.parametrize(
    "device", [pytest.param("cpu", marks=ON_CPU), pytest.param("cuda", marks=ON_GPU)]
)
def test_decode_fp8_cache_in_each_band(paged, device, band,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch in each FP8_BANDS row launches as that row says and matches the twin: lengths
    either side of a tile and of a split boundary. On the CPU, four SMs and two KV heads keep
    the batches small."""
    row = FP8_BANDS[band]
    if device == "cpu":
        kv_heads, heads, dim, sms = 2, 4, 32, 4
        monkeypatch.setattr(paged_decode, "sm_count", lambda device: sms)
    else:
        kv_heads, heads, dim = 8, 16, 128
        sms = sm_count(torch.device(device))
    batch = max(1, int(row.min_pairs_per_sm * sms / kv_heads) + 1)
    lens = [(97 * i) % 700 + 1 for i in range(batch)]
    lens[:3] = [1, 64, 129][:batch]
    assert fp8_band(batch, kv_heads, sms) == row
    splits, _, tiles = resolve_launch(batch, kv_heads, 4096, sms, True)
    assert tiles == row.tiles and (row.num_splits == 0 or splits == row.num_splits)
    check_fp8_decode(paged, lens, 16 if band % 2 else 128, heads, kv_heads, dim, device)


@pytest.mark.parametrize(
    ("lens", "block_size", "num_heads", "num_kv_heads", "head_dim", "num_splits", "tiles",
     "order"),
    [
        ([1, 63, 64, 65, 300, 0], 16, 8, 8, 32, 1, (32, 2, 3), True),
        ([1, 63, 64, 65, 300, 0], 64, 16, 2, 64, 2, (64, 4, 2), False),
        ([1, 127, 128, 129, 1000], 128, 32, 8, 128, 3, (64, 2, 4), True),
        ([1, 127, 128, 129, 1000], 32, 32, 4, 128, None, (128, 4, 2), False),
        ([1, 255, 256, 600], 128, 16, 8, 256, 1, (32, 4, 2), False),
        ([2048, 17, 0, 5], 16, 64, 4, 128, 4, (64, 2, 2), True),
    ],
)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gluon_fp8_decode_shapes_match_twin(paged, lens, block_size, num_heads, num_kv_heads,
                                            head_dim, num_splits, tiles, order) -> None:
    """The Gluon kernel over head dims 32-256, pages shorter and longer than its tiles, GQA
    groups 1-16, split counts, buffer counts, row orders and empty rows."""
    check_fp8_decode(paged, lens, block_size, num_heads, num_kv_heads, head_dim, "cuda",
                     num_splits, DecodeTiles(*tiles), order)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize(
    "device", [pytest.param("cpu", marks=ON_CPU), pytest.param("cuda", marks=ON_GPU)]
)
def test_decode_in_an_order_gives_each_row_its_own_answer(paged, device, fp8,
                                                          num_splits) -> None:
    """Rows started longest first (the engine's order) come out where they were."""
    lens = [5, 70, 1, 33, 0]
    kv = paged.pool(lens, 16, 2, 32, torch.float32, device)
    k, v, kv_scales = paged.fp8(kv) if fp8 else (kv.k_cache, kv.v_cache, None)
    q = torch.randn(len(lens), 4, 32, device=device)
    order = torch.argsort(kv.seq_lens, descending=True).to(torch.int32)
    assert order.tolist() != list(range(len(lens)))
    plain = paged_decode_attention(q, k, v, kv.seq_lens, kv.block_tables, 0.2,
                                   num_splits=num_splits, kv_scales=kv_scales)
    ordered = paged_decode_attention(q, k, v, kv.seq_lens, kv.block_tables, 0.2,
                                     num_splits=num_splits, kv_scales=kv_scales, order=order)
    assert torch.equal(plain, ordered)


@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize(
    "device", [pytest.param("cpu", marks=ON_CPU), pytest.param("cuda", marks=ON_GPU)]
)
def test_decode_empty_sequence_gives_zeros(paged, device, num_splits) -> None:
    """A padded batch slot (seq_len 0, as in a padded CUDA-graph batch) reads nothing."""
    kv = paged.pool([20, 1], 16, 2, 32, torch.float32, device)
    kv.seq_lens[1] = 0
    q = torch.randn(2, 4, 32, device=device)
    out = paged_decode_attention(
        q, kv.k_cache, kv.v_cache, kv.seq_lens, kv.block_tables, 0.2, num_splits=num_splits
    )
    assert torch.all(out[1] == 0)
    assert torch.isfinite(out).all()


def test_choose_num_splits() -> None:
    # A big batch of short contexts already fills the GPU: no split, no reduction pass.
    assert choose_num_splits(256, 8, 512, 132) == (1, 256)
    # Nor does one of long contexts: enough programs per SM balance themselves.
    assert choose_num_splits(256, 8, 4096, 132) == (1, 256)
    # A middling batch of long contexts splits so that no program streams much over
    # SPLIT_TOKENS, in parts of at least MIN_SPLIT_TOKENS keys.
    assert choose_num_splits(64, 8, 4096, 132) == (8, 256)
    # A small batch splits to fill the SMs, in parts as short as one tile at batch <= 4.
    assert choose_num_splits(4, 8, 4096, 132) == (17, 64)
    assert choose_num_splits(8, 8, 4096, 132) == (9, 128)
    assert choose_num_splits(32, 8, 4096, 132) == (8, 256)
    assert choose_num_splits(1, 8, 32768, 132) == (64, 64)
    assert choose_num_splits(1, 8, 300, 132) == (4, 64)
    assert choose_num_splits(1, 8, 50, 132) == (1, 64)


def test_fp8_bands_cover_every_batch() -> None:
    floors = [row.min_pairs_per_sm for row in FP8_BANDS]
    assert floors == sorted(floors, reverse=True) and floors[-1] == 0
    assert fp8_band(256, 8, 132) == FP8_BANDS[0]
    assert fp8_band(1, 8, 132) == FP8_BANDS[-1]
    # Split counts left open take choose_num_splits's, with the band's tiles.
    assert resolve_launch(4, 8, 4096, 132, True)[:2] == (17, 64)


def test_torch_backend_decodes_as_its_varlen_path(paged) -> None:
    """The torch backend's decode path is its varlen path with one query per sequence."""
    kv = paged.pool([5, 20], 16, 2, 16, torch.float32, "cpu")
    q = torch.randn(2, 4, 16)
    meta = AttentionMetadata(paged.starts([1, 1], "cpu"), kv.seq_lens, kv.block_tables,
                             torch.zeros(2, dtype=torch.int32), decode_only=True, max_query_len=1)
    out = TORCH_ATTENTION.decode(q, kv.k_cache, kv.v_cache, meta, 0.25)
    assert torch.equal(out, TORCH_ATTENTION.prefill(q, kv.k_cache, kv.v_cache, meta, 0.25))
