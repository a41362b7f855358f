"""The engine's model and batcher against Hugging Face transformers on the same weights (fp32)."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.engine_builder import build_engine
from llmserve.engine_service.seam import EngineRequest, SamplingOptions

PROMPTS = [[5, 17, 99, 230, 7], [400, 12], list(range(40, 77)), [3] * 20]


@pytest.mark.parametrize("architecture", ["qwen3", "qwen2", "llama"])
def test_logits_and_greedy_tokens_match(
    architecture: str, tiny_checkpoint: Callable[[str], Path]
) -> None:
    model_dir = tiny_checkpoint(architecture)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # A small chunk budget forces chunked prefill across steps with several sequences batched.
    core, info = build_engine(
        EngineConfig(model=model_dir, device="cpu", num_kv_blocks=256, max_num_batched_tokens=16)
    )
    assert info.dtype == "float32"
    new_tokens = 12
    greedy = SamplingOptions(temperature=0.0, max_tokens=new_tokens)
    ours = core.run_to_completion(
        [EngineRequest(f"r{i}", p, greedy) for i, p in enumerate(PROMPTS)]
    )
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            expected = hf.generate(
                torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False
            )[0, len(prompt) :].tolist()
        assert ours[f"r{i}"].token_ids == expected, f"prompt {i}"


@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_last_position_logits_match(
    architecture: str, tiny_checkpoint: Callable[[str], Path]
) -> None:
    model_dir = tiny_checkpoint(architecture)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    core, info = build_engine(EngineConfig(model=model_dir, device="cpu", num_kv_blocks=64))
    sequence = list(range(100, 150))
    core.add_request(
        EngineRequest("teacher", sequence, SamplingOptions(temperature=0, max_tokens=1))
    )
    plan = core.scheduler.schedule()
    assert [c.num_tokens for c in plan.chunks] == [len(sequence)]
    logits, _ = core.runner.execute(plan.chunks)
    with torch.no_grad():
        reference = hf(torch.tensor([sequence])).logits[0, -1]
    torch.testing.assert_close(logits[0], reference, rtol=1e-4, atol=1e-4)
    assert core.pool.num_used == -(-len(sequence) // info.block_size)


def test_logprobs_equal_log_softmax_of_transformers_logits(
    tiny_checkpoint: Callable[[str], Path],
) -> None:
    model_dir = tiny_checkpoint("qwen3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    core, _ = build_engine(EngineConfig(model=model_dir, device="cpu", num_kv_blocks=64))
    prompt = [11, 22, 33, 44, 55, 66]
    options = SamplingOptions(temperature=0.0, max_tokens=6, logprobs=5, ignore_eos=True)
    entries = core.run_to_completion([EngineRequest("lp", prompt, options)])["lp"].logprobs
    sequence = prompt + [e.token_id for e in entries]
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.tensor([sequence])).logits[0].float(), dim=-1)
    for i, entry in enumerate(entries):
        row = reference[len(prompt) - 1 + i]
        assert abs(entry.logprob - row[entry.token_id].item()) < 1e-4
        top_values, top_ids = row.topk(5)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert torch.allclose(torch.tensor([v for _, v in entry.top]), top_values, atol=1e-4)
