"""The engine hands a step's first tokens to their readers before running requests' next ones."""

from llmserve.engine_service.frontend.async_engine import first_tokens_first
from llmserve.engine_service.seam import RequestOutput


def _output(request_id: str, completion_tokens: int) -> RequestOutput:
    return RequestOutput(request_id, [7], completion_tokens=completion_tokens)


def test_first_tokens_go_first_in_step_order() -> None:
    outputs = [_output("a", 9), _output("b", 1), _output("c", 3), _output("d", 1)]
    assert [o.request_id for o in first_tokens_first(outputs)] == ["b", "d", "a", "c"]


def test_a_step_of_one_kind_keeps_its_order() -> None:
    running = [_output("a", 5), _output("b", 2)]
    assert first_tokens_first(running) is running
    new = [_output("c", 1), _output("d", 1)]
    assert first_tokens_first(new) is new
