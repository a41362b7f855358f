"""The engine hands a step's first tokens to their readers before running requests' next ones."""

from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.frontend.async_engine import AsyncEngine
from llmserve.engine_service.seam import (
    EngineRequest,
    LoadSnapshot,
    RejectedRequest,
    RequestOutput,
    StepResult,
)

LOAD = LoadSnapshot(0, 0, 0, 0, 0, (0, 0, 0))


def _step(*request_ids: str) -> StepResult:
    outputs = [RequestOutput(request_id, [7]) for request_id in request_ids]
    return StepResult(outputs, LOAD, [], [], 0, 0)


def test_first_tokens_go_first_in_step_order() -> None:
    engine = AsyncEngine(EngineConfig())
    commands: list[object] = []
    engine._send = commands.append  # no core process: the commands are only recorded
    handed: list[str] = []
    for request_id in "abcde":
        engine.open_stream(EngineRequest(request_id, [1]),
                           lambda item, rid=request_id: handed.append(rid))
    engine._dispatch(_step("a", "c"))
    engine._dispatch(RejectedRequest("e", "duplicate"))
    engine.close_stream("d")
    # b is new; a and c are running; d and e left before their first token.
    engine._dispatch(_step("a", "b", "c", "d"))
    engine._dispatch(_step("a", "b", "c"))
    assert handed == ["a", "c", "e", "b", "a", "c", "a", "b", "c"]
    assert engine._unanswered == set()
