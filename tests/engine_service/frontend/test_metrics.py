"""The engine's per-step metrics: the speculative decoding counters add each step's counts."""

from prometheus_client import REGISTRY

from llmserve.engine_service.frontend import metrics
from llmserve.engine_service.seam import LoadSnapshot, RequestOutput, StepResult

PROPOSED = "llmserve_engine_speculative_proposed_tokens_total"
ACCEPTED = "llmserve_engine_speculative_accepted_tokens_total"
DRAFTS = "llmserve_engine_speculative_drafts_total"
LOAD = LoadSnapshot(2, 0, 90, 100, 0, (0, 2, 0))


def counts() -> tuple[float, ...]:
    return tuple(REGISTRY.get_sample_value(name) or 0.0 for name in (PROPOSED, ACCEPTED, DRAFTS))


def step(proposed: int, accepted: int, drafts: int) -> StepResult:
    outputs = [RequestOutput("a", [5, 6, 7]), RequestOutput("b", [8])]
    return StepResult(outputs, LOAD, [], [], 0, 4, spec_proposed_tokens=proposed,
                      spec_accepted_tokens=accepted, spec_drafts=drafts)


def test_speculative_counters_add_each_steps_totals() -> None:
    before = counts()
    metrics.record_step(step(8, 3, 2))
    metrics.record_step(step(4, 4, 1))
    after = counts()
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == (12, 7, 3)


def test_a_step_without_speculation_leaves_them_and_they_are_exported_from_the_start() -> None:
    before = counts()
    metrics.record_step(StepResult([RequestOutput("a", [5])], LOAD, [], [], 0, 1))
    assert counts() == before
    assert REGISTRY.get_sample_value(PROPOSED) is not None  # a Counter is exported at 0
