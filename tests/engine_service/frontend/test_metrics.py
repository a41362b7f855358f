"""The engine's per-step metrics: the speculative decoding counters add each step's counts."""

from prometheus_client import REGISTRY

from llmserve.engine_service.frontend import metrics
from llmserve.engine_service.seam import LoadSnapshot, RequestOutput, StepResult

PROPOSED = "llmserve_engine_speculative_proposed_tokens_total"
ACCEPTED = "llmserve_engine_speculative_accepted_tokens_total"
LOAD = LoadSnapshot(2, 0, 90, 100, 0, (0, 2, 0))


def counts() -> tuple[float, float]:
    return REGISTRY.get_sample_value(PROPOSED) or 0.0, REGISTRY.get_sample_value(ACCEPTED) or 0.0


def step(proposed: int, accepted: int) -> StepResult:
    outputs = [RequestOutput("a", [5, 6, 7]), RequestOutput("b", [8])]
    return StepResult(outputs, LOAD, [], [], 0, 4, spec_proposed_tokens=proposed,
                      spec_accepted_tokens=accepted)


def test_speculative_counters_add_each_steps_totals() -> None:
    before = counts()
    metrics.record_step(step(8, 3))
    metrics.record_step(step(4, 4))
    after = counts()
    assert (after[0] - before[0], after[1] - before[1]) == (12, 7)


def test_a_step_without_speculation_leaves_them_and_they_are_exported_from_the_start() -> None:
    before = counts()
    metrics.record_step(StepResult([RequestOutput("a", [5])], LOAD, [], [], 0, 1))
    assert counts() == before
    assert REGISTRY.get_sample_value(PROPOSED) is not None  # a Counter is exported at 0
