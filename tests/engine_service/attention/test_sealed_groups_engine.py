"""Sealed groups in the engine: an e4m3 cache seals each full group of 16 tokens once the step
that fills it has run, and generation is what it is with nothing sealed."""

import os

import pytest
import torch

from llmserve.engine_service.attention import kv_cache
from llmserve.kernels.sealed_groups import GROUP, grouped_view, sealed_view

# Prompts crossing group and page boundaries in prefill chunks and in decode (127 + 12
# tokens), and one that reuses the first's cached full page, read sealed by a later step.
LONG = [list(range(3, 160)), [7, 9] * 63 + [5], [11] * 130]
REUSE = [[*range(3, 131), 400, 401, 402]]


def run_all(core, greedy) -> list[list[int]]:
    return greedy(core, LONG, 12, ignore_eos=True) + greedy(core, REUSE, 12, ignore_eos=True)


def v_pools(core) -> list[torch.Tensor]:
    return [cache.v for cache in core.runner.attention.kv_caches]


@pytest.mark.parametrize("block_size", [16, 128])
def test_engine_seals_full_groups_and_generates_as_unsealed(
        tiny_checkpoint, make_core, greedy, monkeypatch: pytest.MonkeyPatch,
        block_size: int) -> None:
    model_dir = tiny_checkpoint("qwen3")
    sealed = make_core(model_dir, device="cpu", kv_cache_dtype="fp8_e4m3",
                       block_size=block_size)
    assert sealed.runner.attention.sealed
    tokens = run_all(sealed, greedy)
    monkeypatch.setattr(kv_cache, "seals_groups", lambda *args: False)
    unsealed = make_core(model_dir, device="cpu", kv_cache_dtype="fp8_e4m3",
                         block_size=block_size)
    assert not unsealed.runner.attention.sealed
    assert run_all(unsealed, greedy) == tokens
    # The same blocks hold the same rows: each group transposed if full, as written if not.
    num_sealed = 0
    for v, v_open in zip(v_pools(sealed), v_pools(unsealed), strict=True):
        for block in range(v.shape[0]):
            for group in range(block_size // GROUP):
                written = grouped_view(v_open)[block, group].view(torch.uint8)
                if torch.equal(grouped_view(v)[block, group].view(torch.uint8), written):
                    continue
                assert torch.equal(sealed_view(v)[block, group].view(torch.uint8), written)
                num_sealed += 1
    # Per layer, each sequence's full groups (the reused prompt's shared page counted once).
    full = sum((len(p) + 12 - 1) // GROUP for p in LONG) + (131 + 12 - 1) // GROUP - 8
    assert num_sealed == full * len(v_pools(sealed))


def test_speculative_decoding_keeps_groups_open(tiny_checkpoint, make_core) -> None:
    core = make_core(tiny_checkpoint("qwen3"), device="cpu", kv_cache_dtype="fp8_e4m3",
                     block_size=128, speculative_method="ngram")
    assert not core.runner.attention.sealed


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="the Triton backend runs on the CPU only in Triton's interpreter")
def test_triton_backend_reads_and_seals_pages_as_torch(tiny_checkpoint, make_core, greedy,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tiny_checkpoint("qwen3")
    reference = run_all(make_core(model_dir, device="cpu", kv_cache_dtype="fp8_e4m3",
                                  block_size=128), greedy)
    monkeypatch.setenv("LLMSERVE_TRITON_ON_CPU", "1")
    core = make_core(model_dir, device="cpu", attention_backend="triton",
                     kv_cache_dtype="fp8_e4m3", block_size=128)
    assert core.runner.attention.sealed and core.runner.ops.name == "triton"
    assert run_all(core, greedy) == reference
