"""Engine core behaviour on the demo model: prefix reuse, chunked prefill, preemption, seeds."""

import random

from llmserve.common.block_hash import hash_full_blocks
from llmserve.engine_service.core.core_process import net_cache_changes
from llmserve.engine_service.seam import EngineRequest, SamplingOptions

GREEDY = SamplingOptions(temperature=0.0, max_tokens=8, ignore_eos=True)


def test_shared_1024_token_prefix_computes_only_the_suffix(demo_core) -> None:
    core = demo_core(num_kv_blocks=512, max_num_batched_tokens=2048)
    prefix = [random.Random(0).randrange(3, 600) for _ in range(1024)]
    first = core.run_to_completion([EngineRequest("a", [*prefix, 7, 8, 9], GREEDY)])["a"]
    assert first.cached_prompt_tokens == 0
    computed_before = core.num_computed_tokens_total
    second = core.run_to_completion([EngineRequest("b", [*prefix, 11, 12, 13, 14, 15], GREEDY)])
    # Only the 5 new prompt tokens plus the 7 decode steps after the first token are computed.
    assert core.num_computed_tokens_total - computed_before == 5 + (GREEDY.max_tokens - 1)
    assert second["b"].cached_prompt_tokens == 1024
    assert second["b"].prompt_tokens == 1029


def test_long_prompt_never_starves_running_decodes(demo_core) -> None:
    budget = 512
    core = demo_core(num_kv_blocks=1024, max_num_batched_tokens=budget, max_num_seqs=16)
    decoding = SamplingOptions(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i in range(8):
        core.add_request(EngineRequest(f"d{i}", [5 + i, 6, 7, 8], decoding))
    for _ in range(3):
        core.step()
    core.add_request(
        EngineRequest("long", [9] * 4096, SamplingOptions(temperature=0, max_tokens=2))
    )
    prefill_steps = 0
    while "long" in core.sequences and core.sequences["long"][0].num_output_tokens == 0:
        produced = {out.request_id for out in core.step()}
        prefill_steps += 1
        # Every decoding sequence gets its token in every step the long prompt is prefilled.
        assert {f"d{i}" for i in range(8)} <= produced
    assert prefill_steps >= 4096 // budget


def test_critical_request_preempts_batch_work_which_still_finishes_exactly(demo_core) -> None:
    options = SamplingOptions(temperature=0.0, max_tokens=48, ignore_eos=True)
    prompts = {f"batch{i}": [20 + i] * 60 for i in range(3)}
    alone = {}
    for name, prompt in prompts.items():
        core = demo_core(num_kv_blocks=64)
        alone[name] = core.run_to_completion([EngineRequest(name, prompt, options)])[name].token_ids
    critical_prompt = [300] * 100
    core = demo_core(num_kv_blocks=20)  # 320 tokens: the three batch requests fill it
    alone["critical"] = demo_core(num_kv_blocks=64).run_to_completion(
        [EngineRequest("critical", critical_prompt, options)]
    )["critical"].token_ids
    outputs: dict[str, list[int]] = {name: [] for name in [*prompts, "critical"]}
    for name, prompt in prompts.items():
        core.add_request(EngineRequest(name, prompt, options, priority=2))
    for _ in range(4):
        for out in core.step():
            outputs[out.request_id].extend(out.new_token_ids)
    assert len(core.scheduler.running) == 3
    core.add_request(EngineRequest("critical", critical_prompt, options, priority=0))
    first_critical_step = None
    step = 0
    while core.has_work:
        step += 1
        for out in core.step():
            outputs[out.request_id].extend(out.new_token_ids)
            if out.request_id == "critical" and first_critical_step is None:
                first_critical_step = step
    assert core.scheduler.num_preemptions >= 1
    assert first_critical_step == 1  # admitted at once, by preempting batch work
    for name, tokens in outputs.items():
        assert tokens == alone[name], name


def test_seeded_request_gives_same_tokens_alone_or_in_a_batch_of_32(demo_core) -> None:
    seeded = SamplingOptions(
        temperature=0.9, top_p=0.95, top_k=40, seed=1234, max_tokens=16, ignore_eos=True
    )
    prompt = [40, 41, 42, 43, 44]
    alone = demo_core().run_to_completion([EngineRequest("s", prompt, seeded)])["s"].token_ids
    others = [
        EngineRequest(
            f"o{i}",
            [50 + i] * (3 + i),
            SamplingOptions(temperature=1.0, max_tokens=10 + i % 7, ignore_eos=True),
        )
        for i in range(31)
    ]
    batch = demo_core(max_num_batched_tokens=64).run_to_completion(
        [*others[:16], EngineRequest("s", prompt, seeded), *others[16:]]
    )
    assert batch["s"].token_ids == alone


def test_kv_event_replay_equals_the_pool(demo_core) -> None:
    core = demo_core(num_kv_blocks=48, max_num_batched_tokens=96)
    rng = random.Random(3)
    mirror: set[int] = set()
    shared = [rng.randrange(3, 600) for _ in range(40)]
    for i in range(40):
        prompt = shared[: rng.randrange(0, 40)] + [
            rng.randrange(3, 600) for _ in range(rng.randrange(1, 60))
        ]
        core.add_request(
            EngineRequest(
                f"r{i}",
                prompt,
                SamplingOptions(temperature=0.0, max_tokens=rng.randrange(1, 20), ignore_eos=True),
            )
        )
        for _ in range(rng.randrange(0, 4)):
            core.step()
            stored, removed = net_cache_changes(core.pool.take_events())
            assert not mirror & set(stored) and set(removed) <= mirror
            mirror.difference_update(removed)
            mirror.update(stored)
    while core.has_work:
        core.step()
    stored, removed = net_cache_changes(core.pool.take_events())
    mirror.difference_update(removed)
    mirror.update(stored)
    assert mirror == set(core.pool.cached)
    assert core.pool.num_free == core.pool.num_blocks


def test_block_hashes_follow_the_published_formula(demo_core) -> None:
    core = demo_core(num_kv_blocks=64)
    prompt = list(range(100, 150))
    one_token = SamplingOptions(temperature=0, max_tokens=1)
    core.run_to_completion([EngineRequest("h", prompt, one_token)])
    expected = hash_full_blocks(prompt, 16, seed=0)
    assert set(expected) <= set(core.pool.cached)
