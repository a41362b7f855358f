"""A reader that lags gets its queued responses as one: the router merges them as the engine
merges the outputs it could not send yet."""

from llmserve.common.stream_order import by_sample
from llmserve.engine_service.frontend.messages import response_from_outputs
from llmserve.engine_service.seam import FinishReason, RequestOutput, TokenLogprobs
from llmserve.router.engine_link import merge_per_sample, merge_responses


def _outputs() -> list[RequestOutput]:
    def logprobs(*tokens: int) -> list[TokenLogprobs]:
        return [TokenLogprobs(t, -0.5, [(t, -0.5), (t + 1, -1.5)]) for t in tokens]

    return [
        RequestOutput("r", [5, 6], logprobs(5, 6), None, 40, 2, 16,
                      prompt_logprobs=logprobs(11, 12)),
        # Usage is the newest whole: a count back at zero replaces the older one.
        RequestOutput("r", [7], logprobs(7), None, 40, 3, 0),
        RequestOutput("r", [8], logprobs(8), FinishReason.LENGTH, 40, 4, 0),
    ]


def test_the_router_merges_as_the_engine_does() -> None:
    outputs = _outputs()
    one_each = [response_from_outputs([output]) for output in outputs]
    merged = merge_responses(one_each)
    assert merged == response_from_outputs(outputs)
    assert list(merged.token_ids) == [5, 6, 7, 8] and merged.usage.cached_prompt_tokens == 0
    assert [lp.token_id for lp in merged.prompt_logprobs] == [11, 12]
    assert [t.token_id for t in merged.prompt_logprobs[1].top_logprobs] == [12, 13]


def test_a_lone_response_passes_through() -> None:
    response = response_from_outputs(_outputs()[:1])
    assert merge_responses([response]) is response


def test_samples_are_merged_each_on_its_own() -> None:
    outputs = [RequestOutput("r", [t], index=i, completion_tokens=k + 1)
               for k, (t, i) in enumerate([(5, 0), (6, 1), (7, 0), (8, 2), (9, 1)])]
    engine_side = [response_from_outputs(group) for group in by_sample(outputs)]
    router_side = merge_per_sample([response_from_outputs([output]) for output in outputs])
    assert engine_side == router_side
    assert [(r.index, list(r.token_ids)) for r in router_side] == [(0, [5, 7]), (1, [6, 9]),
                                                                   (2, [8])]
    assert [r.usage.completion_tokens for r in router_side] == [3, 5, 4]
