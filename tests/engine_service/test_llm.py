"""The offline API: every prompt's result, in prompt order, from the core's own offline loop."""

from dataclasses import replace
from pathlib import Path

from llmserve.engine_service.llm import LLM
from llmserve.engine_service.seam import FinishReason, SamplingOptions


def test_generate_returns_each_prompt_result_in_order(demo_dir: Path) -> None:
    llm = LLM(demo_dir, device="cpu")
    prompts = [[5, 6, 7], [8, 9], [10] * 20]
    options = [SamplingOptions(temperature=0.0, max_tokens=n, ignore_eos=True,
                               logprobs=1 if n == 3 else None) for n in (3, 5, 7)]
    results = llm.generate(prompts, options)
    assert [len(r.token_ids) for r in results] == [3, 5, 7]
    assert [r.finish_reason for r in results] == [FinishReason.LENGTH] * 3
    assert [len(r.logprobs) for r in results] == [3, 0, 0]
    alone = llm.generate([prompts[1]], options[1], use_tqdm=False)[0]
    assert alone.token_ids == results[1].token_ids


def test_generate_returns_every_sample_of_an_n_request(demo_dir: Path) -> None:
    llm = LLM(demo_dir, device="cpu")
    greedy = SamplingOptions(temperature=0.0, max_tokens=4, ignore_eos=True)
    (one,) = llm.generate([[5, 6, 7]], greedy, use_tqdm=False)
    (three,) = llm.generate([[5, 6, 7]], replace(greedy, n=3), use_tqdm=False)
    assert [s.index for s in three.samples] == [0, 1, 2] and three is three.samples[0]
    assert [s.token_ids for s in three.samples] == [one.token_ids] * 3
