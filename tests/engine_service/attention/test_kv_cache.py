"""The paged KV cache's dtypes: bytes per block, the pool's layout, the flag's checks, and an
e4m3 cache under prefix caching and preemption (blocks are blocks, whatever they hold)."""

import pytest
import torch

from llmserve.engine_service.attention import kv_cache
from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.seam import EngineRequest, SamplingOptions

GREEDY = SamplingOptions(temperature=0.0, max_tokens=24, ignore_eos=True)


def test_an_fp8_block_takes_about_half_the_bytes() -> None:
    bf16 = kv_cache.bytes_per_block(28, 16, 8, 128, torch.bfloat16, "auto")
    fp8 = kv_cache.bytes_per_block(28, 16, 8, 128, torch.bfloat16, "fp8_e4m3")
    assert bf16 == 2 * 28 * 16 * 8 * 128 * 2
    # A byte per element plus a 2-byte scale per 128-element row: 1.97x the blocks per GiB.
    assert fp8 == 2 * 28 * 16 * 8 * (128 + 2)
    assert bf16 / fp8 == pytest.approx(256 / 130)


def test_fp8_pool_layout() -> None:
    layers = kv_cache.allocate(2, 5, 16, 2, 32, torch.float32, "fp8_e4m3", torch.device("cpu"))
    assert len(layers) == 2
    k, v, scales = layers[1]
    assert k.dtype == v.dtype == torch.float8_e4m3fn and k.shape == (5, 16, 2, 32)
    assert scales is not None and all(s.shape == (5, 2, 16) for s in scales)
    assert scales[0].stride() == scales[1].stride() and scales[0].stride(-1) == 1
    # Per (block, KV head): K's 16 rows of 32, their 16 scales, V's rows, theirs; one run.
    unit = 2 * (16 * 32 + 16 * 2)
    assert k.stride() == (2 * unit, 32, unit, 1) and v.stride() == k.stride()
    assert scales[0].dtype == torch.bfloat16
    assert scales[0].stride() == (2 * unit // 2, unit // 2, 1)
    base = k.untyped_storage().data_ptr()
    assert k.untyped_storage().data_ptr() == scales[1].untyped_storage().data_ptr()
    assert [t.data_ptr() - base for t in (layers[0].k, layers[0].scales[0], layers[0].v,
                                          layers[0].scales[1], k)] == [0, 512, 544, 1056,
                                                                       5 * 2 * unit]
    # Writes through one view land nowhere another view reads.
    k.view(torch.uint8).fill_(1)
    assert int(v.view(torch.uint8).sum()) == 0 and float(scales[0].sum()) == 0.0
    plain = kv_cache.allocate(2, 5, 16, 2, 32, torch.float32, "auto", torch.device("cpu"))
    assert plain[0].k.dtype == torch.float32 and plain[0].scales is None


def test_quantize_pages_holds_each_row_within_half_an_e4m3_step() -> None:
    k, v = (torch.randn(5, 16, 2, 32) * torch.logspace(-3, 2, 32) for _ in range(2))
    cache = kv_cache.quantize_pages(k, v, chunk=2)  # chunks that do not divide the blocks
    assert cache.scales is not None
    assert cache.k.stride() == kv_cache.allocate(1, 5, 16, 2, 32, torch.float32, "fp8_e4m3",
                                                 torch.device("cpu"))[0].k.stride()
    for pages, values, scales in zip((k, v), (cache.k, cache.v), cache.scales, strict=True):
        row_scales = scales.transpose(1, 2)  # [blocks, slots, heads], as the pages' rows
        exact = pages.abs().amax(-1) / 448
        assert bool(((row_scales >= exact) & (row_scales <= exact * (1 + 2.0**-7))).all())
        restored = values.float() * row_scales[..., None]
        # 3 mantissa bits: half a step is 1/16 of a value, and the subnormals' steps are
        # 2^-9 of the scale.
        bound = pages.abs() / 16 + row_scales[..., None] * 2.0**-10
        assert bool(((restored - pages).abs() <= bound * 1.0001).all())


def test_the_flag_refuses_flash_attn_naming_both_flags() -> None:
    with pytest.raises(ValueError, match=r"--kv-cache-dtype fp8_e4m3.*--attention-backend"):
        EngineConfig(kv_cache_dtype="fp8_e4m3", attention_backend="flash_attn")
    with pytest.raises(ValueError, match=r"--kv-cache-dtype fp8_e4m3.*--decode-backend"):
        EngineConfig(kv_cache_dtype="fp8_e4m3", decode_backend="flash_attn")
    with pytest.raises(ValueError, match="kv-cache-dtype"):
        EngineConfig(kv_cache_dtype="fp8")
    EngineConfig(kv_cache_dtype="fp8_e4m3", attention_backend="triton")
    kv_cache.check_kv_cache_dtype("fp8_e4m3", torch.device("cpu"))  # the CPU has torch's e4m3


def test_fp8_cache_reuses_prefixes_and_survives_preemption(demo_core) -> None:
    core = demo_core(num_kv_blocks=512, kv_cache_dtype="fp8_e4m3")
    prompt = list(range(3, 67))
    first = core.run_to_completion([EngineRequest("a", prompt, GREEDY)])["a"]
    again = core.run_to_completion([EngineRequest("b", prompt, GREEDY)])["b"]
    assert again.cached_prompt_tokens == 48 and again.token_ids == first.token_ids
    # 12 blocks of 16 tokens for 4 sequences growing to 60 tokens: preemption is certain.
    tight = demo_core(num_kv_blocks=12, max_num_seqs=4, kv_cache_dtype="fp8_e4m3")
    requests = [EngineRequest(f"r{i}", [5 + i] * 36, GREEDY) for i in range(4)]
    results = tight.run_to_completion(requests)
    assert tight.scheduler.num_preemptions > 0
    assert all(len(results[r.request_id].token_ids) == 24 for r in requests)
