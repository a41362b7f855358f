"""Speculative decoding on CUDA: verification steps replay the varlen graphs, the draft model's
passes its own decode and varlen graphs, drafts are fed back on the device. In fp32 the greedy
tokens equal plain decoding's (in bf16 the extend and decode kernels round differently, so a
near-tie may break the other way, as it may between batch shapes without speculation)."""

import random

import pytest
import torch

from llmserve.engine_service.seam import EngineRequest, SamplingOptions

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def prompts(count: int) -> list[list[int]]:
    rng = random.Random(4)
    out = []
    for _ in range(count):
        span = [rng.randrange(3, 600) for _ in range(rng.randrange(3, 10))]
        out.append(span * rng.randrange(2, 6))
    return out


def run(core, batch: list[list[int]]) -> dict[str, list[int]]:
    options = SamplingOptions(temperature=0.0, max_tokens=40, ignore_eos=True)
    results = core.run_to_completion(
        [EngineRequest(f"r{i}", p, options) for i, p in enumerate(batch)])
    return {k: v.token_ids for k, v in results.items()}


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_speculation_on_cuda_is_plain_decoding(tiny_checkpoint, make_core,
                                                      method: str) -> None:
    model_dir = tiny_checkpoint("qwen3")
    batch = prompts(6)
    settings = {"dtype": "float32", "max_num_batched_tokens": 256, "cuda_graph_max_tokens": 256}
    plain = run(make_core(model_dir, **settings), batch)
    extra = {"speculative_draft_model": model_dir} if method == "draft" else {}
    core = make_core(model_dir, **settings, speculative_method=method,
                     num_speculative_tokens=4, speculative_disable_batch_size=8, **extra)
    assert core.runner.varlen_graphs is not None
    assert run(core, batch) == plain
    assert core.num_spec_proposed_total > 0 and core.num_spec_accepted_total > 0
    if method == "draft":  # the draft is the target: every greedy guess is kept
        assert core.num_spec_accepted_total == core.num_spec_proposed_total
