"""Prompt logprobs against Hugging Face transformers on the same weights (fp32): whole prompts,
prompts chunked over several steps, graph replays, async scheduling, and batches where only
some requests ask."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from llmserve.engine_service.runner.cuda_graphs import (
    eager_capture,
    graph_batch_sizes,
    varlen_graph_sizes,
)
from llmserve.engine_service.seam import EngineRequest, SamplingOptions

PROMPT = list(range(40, 77))  # 37 tokens: 3 chunks at a budget of 16, 13 at a budget of 3
ZERO_PROMPT = [3] * 20
PLAIN_PROMPT = [5, 17, 99, 230, 7]


def reference(model_dir: Path, prompt: list[int]) -> torch.Tensor:
    """Transformers' log-softmax at every position of `prompt` [P, vocab]."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)


# (budget, graphs, async scheduling). A budget of 3 makes late prompt chunks of one token beside
# decodes: steps of the decode layout (and its graphs) that score the prompt.
@pytest.mark.parametrize("budget, graphs, async_scheduling", [
    (64, False, False), (16, False, False), (16, True, True), (3, True, False), (3, False, True),
])
def test_prompt_logprobs_equal_transformers_log_softmax(
    budget: int, graphs: bool, async_scheduling: bool,
    tiny_checkpoint: Callable[[str], Path], make_core: Callable[..., object],
) -> None:
    model_dir = tiny_checkpoint("qwen3")

    def core():
        # max_num_seqs 4: the LM head scores the prompt 4 rows at a time, so in many slices.
        built = make_core(model_dir, device="cpu", max_num_batched_tokens=budget, max_num_seqs=4,
                          async_scheduling=async_scheduling)
        if graphs:
            built.runner.capture_graphs(graph_batch_sizes(4), varlen_graph_sizes(budget),
                                        eager_capture, progress=False)
        return built

    def options(prompt_logprobs: int | None) -> SamplingOptions:
        return SamplingOptions(temperature=0.0, max_tokens=6, prompt_logprobs=prompt_logprobs)

    prompts = {"ask": PROMPT, "plain": PLAIN_PROMPT, "zero": ZERO_PROMPT}
    asked = {"ask": 5, "plain": None, "zero": 0}
    results = core().run_to_completion(
        [EngineRequest(name, prompt, options(asked[name])) for name, prompt in prompts.items()])
    unasked = core().run_to_completion(
        [EngineRequest(name, prompt, options(None)) for name, prompt in prompts.items()])
    for name in prompts:  # asking changes no request's tokens, its own or its neighbours'
        assert results[name].token_ids == unasked[name].token_ids, name
    assert results["plain"].prompt_logprobs is None

    for name in ("ask", "zero"):
        prompt, k = prompts[name], asked[name]
        expected = reference(model_dir, prompt)
        entries = results[name].prompt_logprobs
        assert entries is not None
        assert [e.token_id for e in entries] == prompt[1:]
        for position, entry in enumerate(entries):
            row = expected[position]
            assert abs(entry.logprob - row[prompt[position + 1]].item()) < 1e-4, (name, position)
            assert len(entry.top) == k
            if k:
                top_values, top_ids = row.topk(k)
                assert [t for t, _ in entry.top] == top_ids.tolist(), (name, position)
                torch.testing.assert_close(torch.tensor([v for _, v in entry.top]), top_values,
                                           rtol=0, atol=1e-4)
