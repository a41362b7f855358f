"""The overlapped step loop (tokens read while the next step runs) changes nothing but timing:
the same tokens, finish reasons, usage, prefix-cache events and freed blocks as the plain loop,
through stops, length limits, aborts, late arrivals, logprobs and preemption."""

import random

from llmserve.engine_service.core.core_process import net_cache_changes
from llmserve.engine_service.seam import EngineRequest, FinishReason, SamplingOptions

# Requests with options[2] stop on this token or the end-of-sequence token.
STOP_TOKEN = 0


def scenario(core) -> tuple[dict, list, int]:
    """Runs a fixed mix of requests with arrivals and an abort at fixed steps."""
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 600) for _ in range(rng.randrange(1, 40))] for _ in range(10)]
    shared = [rng.randrange(3, 600) for _ in range(32)]
    options = [
        SamplingOptions(temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingOptions(temperature=0.8, max_tokens=16, seed=11, ignore_eos=True),
        SamplingOptions(temperature=0.0, max_tokens=24, stop_token_ids=(STOP_TOKEN,)),
        SamplingOptions(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2),
    ]
    late = [EngineRequest(f"late{i}", shared + prompts[i][:5], options[i % 2]) for i in range(3)]
    for i, prompt in enumerate(prompts):
        core.add_request(EngineRequest(f"r{i}", shared + prompt, options[i % len(options)]))
    outputs: dict[str, list] = {}
    events = []
    steps = overlapped = 0
    while core.has_work or late:
        if steps in (4, 9, 17) and late:
            core.add_request(late.pop())
        if steps == 6:
            core.abort_request("r5")
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(
                (out.new_token_ids, out.finish_reason, out.completion_tokens,
                 None if out.new_logprobs is None else
                 [(lp.token_id, round(lp.logprob, 4)) for lp in out.new_logprobs]))
        events += core.pool.take_events()
        steps += 1
        overlapped += core._in_flight is not None
    stored, removed = net_cache_changes(events)
    return outputs, [sorted(stored), sorted(removed), core.pool.num_free], overlapped


def test_overlapped_loop_matches_the_plain_loop(demo_core) -> None:
    outputs, cache, none = scenario(demo_core(num_kv_blocks=512, max_num_seqs=8,
                                              async_scheduling=False))
    assert none == 0
    overlapped_core = demo_core(num_kv_blocks=512, max_num_seqs=8, async_scheduling=True)
    again, cache_again, overlapped = scenario(overlapped_core)
    assert (again, cache_again) == (outputs, cache)
    assert overlapped > 10
    assert outputs["r5"][-1][1] is None  # aborted mid-way
    finished = {name: out[-1][1] for name, out in outputs.items() if name != "r5"}
    assert all(reason is not None for reason in finished.values())
    assert FinishReason.STOP in finished.values()  # a stop ended one early


def test_overlapped_loop_survives_preemption(demo_core) -> None:
    # 16 blocks of 16 tokens for 6 sequences growing to ~70 tokens: preemption is certain.
    outputs, cache, _ = scenario(demo_core(num_kv_blocks=16, max_num_seqs=6,
                                           async_scheduling=False))
    overlapped_core = demo_core(num_kv_blocks=16, max_num_seqs=6, async_scheduling=True)
    again, cache_again, overlapped = scenario(overlapped_core)
    assert (again, cache_again) == (outputs, cache)
    assert overlapped > 0 and overlapped_core.scheduler.num_preemptions > 0


def test_a_more_important_prompt_ahead_of_pending_decodes(demo_core) -> None:
    """Its prompt chunk comes first in the step, so the decodes' pending tokens sit further
    into the flat batch than their chunk's index: they must still land on their own row."""
    options = SamplingOptions(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(async_scheduling: bool) -> dict[str, list[int]]:
        core = demo_core(num_kv_blocks=512, max_num_seqs=8, async_scheduling=async_scheduling)
        for i in range(3):
            core.add_request(EngineRequest(f"d{i}", [5 + i, 6, 7, 8], options, priority=2))
        outputs: dict[str, list[int]] = {}
        steps = 0
        while core.has_work:
            if steps == 3:
                core.add_request(EngineRequest("critical", list(range(30, 60)), options,
                                               priority=0))
            for out in core.step():
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
            steps += 1
        return outputs

    assert run(async_scheduling=True) == run(async_scheduling=False)


def test_steps_that_admit_or_prefill_are_launched_before_the_previous_step_is_read(
    demo_core, monkeypatch
) -> None:
    """A step admitting a new request, or computing a prompt chunk, runs beside the step in
    flight: it is launched before that step's tokens are read."""
    from llmserve.engine_service.core.step_in_flight import StepInFlight

    core = demo_core(num_kv_blocks=512, max_num_seqs=8, max_num_batched_tokens=16,
                     async_scheduling=True)
    events: list[str] = []
    execute, read_tokens = core.runner.execute, StepInFlight.read_tokens

    def recording_execute(chunks, pending=None, scoring=None, drafts=None):
        events.append("launch " + ",".join(f"{c.seq.request_id}:{c.num_tokens}" for c in chunks))
        return execute(chunks, pending, scoring, drafts)

    def recording_read(step):
        events.append("read")
        return read_tokens(step)

    monkeypatch.setattr(core.runner, "execute", recording_execute)
    monkeypatch.setattr(StepInFlight, "read_tokens", recording_read)
    options = SamplingOptions(temperature=0.0, max_tokens=4, ignore_eos=True)
    core.add_request(EngineRequest("a", list(range(3, 9)), options))
    core.step()
    core.add_request(EngineRequest("b", list(range(20, 60)), options))  # 40 tokens: 3 chunks
    for _ in range(3):
        core.step()
    # Each later launch (admitting b, then b's next prompt chunks) precedes the read of the
    # step before it.
    assert events[:6] == ["launch a:6", "launch a:1,b:15", "read", "launch a:1,b:15", "read",
                          "launch a:1,b:10"], events
