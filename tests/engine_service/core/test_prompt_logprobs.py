"""A request's prompt logprobs in the core: never from the prefix cache, delivered once on its
first output, whole and once across a preemption before or after it."""

from collections.abc import Callable
from pathlib import Path

import pytest

from llmserve.engine_service.core.engine_core import EngineCore
from llmserve.engine_service.seam import EngineRequest, RequestOutput, SamplingOptions

PROMPT = list(range(40, 100))  # 60 tokens: 3 full blocks of 16
ASKING = SamplingOptions(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=2)


def test_cached_prompt_is_computed_again_for_its_logprobs(
    tiny_checkpoint: Callable[[str], Path], make_core: Callable[..., EngineCore]
) -> None:
    core = make_core(tiny_checkpoint("qwen3"), device="cpu")
    first = core.run_to_completion([EngineRequest("first", PROMPT, ASKING)])["first"]
    again = core.run_to_completion([EngineRequest("again", PROMPT, ASKING)])["again"]
    plain = SamplingOptions(temperature=0.0, max_tokens=20, ignore_eos=True)
    unasked = core.run_to_completion([EngineRequest("plain", PROMPT, plain)])["plain"]
    assert first.prompt_logprobs is not None and len(first.prompt_logprobs) == len(PROMPT) - 1
    assert again.prompt_logprobs == first.prompt_logprobs
    assert again.cached_prompt_tokens == first.cached_prompt_tokens == 0
    # The blocks were there to be had: a request that does not ask gets them.
    assert unasked.cached_prompt_tokens == 48
    assert again.token_ids == first.token_ids == unasked.token_ids


def _outputs(core: EngineCore, name: str) -> list[RequestOutput]:
    outputs = []
    while core.has_work:
        outputs += [out for out in core.step() if out.request_id == name]
    return outputs


@pytest.mark.parametrize("preempted", ["mid_prefill", "after_first_token"])
def test_preempted_request_delivers_its_prompt_logprobs_once(
    preempted: str, tiny_checkpoint: Callable[[str], Path], make_core: Callable[..., EngineCore]
) -> None:
    model_dir = tiny_checkpoint("qwen3")
    alone = make_core(model_dir, device="cpu").run_to_completion(
        [EngineRequest("ask", PROMPT, ASKING)])["ask"]
    # 8 blocks of 16 tokens: the critical request's 100 + 20 tokens take them all.
    core = make_core(model_dir, device="cpu", num_kv_blocks=8)
    core.add_request(EngineRequest("ask", PROMPT, ASKING, priority=2))
    outputs = []
    while len(outputs) < (0 if preempted == "mid_prefill" else 2):
        outputs += [out for out in core.step() if out.request_id == "ask"]
    if preempted == "mid_prefill":
        core.step()  # one chunk of the prompt scored
    assert core.sequences["ask"][0].num_computed_tokens >= 16
    critical = SamplingOptions(temperature=0.0, max_tokens=20, ignore_eos=True)
    core.add_request(EngineRequest("critical", [300] * 100, critical, priority=0))
    outputs += _outputs(core, "ask")
    assert core.scheduler.num_preemptions >= 1
    delivered = [out.prompt_logprobs for out in outputs if out.prompt_logprobs is not None]
    assert delivered == [alone.prompt_logprobs]
    assert outputs[0].prompt_logprobs is not None
    assert [t for out in outputs for t in out.new_token_ids] == alone.token_ids
