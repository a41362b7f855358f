"""n > 1 in the engine core: the prompt computed once, its blocks shared by reference count, each
sample seeded `seed + index`, every block freed after finish, abort and preemption."""

from dataclasses import replace

import pytest

from llmserve.engine_service.seam import EngineRequest, FinishReason, SamplingOptions

GREEDY = SamplingOptions(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPT = [(7 * i) % 500 + 3 for i in range(70)]  # 4 full blocks of 16, then 6 tokens
SHARED = 64


@pytest.mark.parametrize(
    "settings",
    [{}, {"prefix_caching": False}, {"async_scheduling": True}],
    ids=["prefix_caching", "no_prefix_caching", "async_scheduling"],
)
def test_greedy_samples_equal_one_request_and_the_prompt_is_computed_once(demo_core,
                                                                         settings) -> None:
    alone = demo_core(**settings).run_to_completion([EngineRequest("one", PROMPT, GREEDY)])
    core = demo_core(**settings)
    result = core.run_to_completion([EngineRequest("four", PROMPT, replace(GREEDY, n=4))])
    samples = result["four"].samples
    assert [s.index for s in samples] == [0, 1, 2, 3]
    assert all(s.token_ids == alone["one"].token_ids for s in samples)
    assert all(s.finish_reason is FinishReason.LENGTH for s in samples)
    # The prompt once, each later sample's tail past the shared blocks, and the decode steps
    # after each sample's first token.
    expected = len(PROMPT) + 3 * (len(PROMPT) - SHARED) + 4 * (GREEDY.max_tokens - 1)
    assert core.num_computed_tokens_total == expected
    assert [s.cached_prompt_tokens for s in samples] == [0, SHARED, SHARED, SHARED]
    assert all(s.prompt_tokens == len(PROMPT) for s in samples)
    assert core.pool.num_free == core.pool.num_blocks and not any(core.pool.ref_counts)


def test_sample_i_draws_as_a_request_seeded_seed_plus_i(demo_core) -> None:
    seeded = SamplingOptions(temperature=1.0, max_tokens=12, ignore_eos=True)
    for seed in (1234, 2**64 - 2):  # the second wraps: its sample 2 is seeded 0
        core = demo_core()
        samples = core.run_to_completion(
            [EngineRequest("n", PROMPT, replace(seeded, seed=seed, n=3))])["n"].samples
        for i, sample in enumerate(samples):
            own = replace(seeded, seed=(seed + i) % 2**64)
            alone = demo_core().run_to_completion([EngineRequest("a", PROMPT, own)])["a"]
            assert sample.token_ids == alone.token_ids
        assert len({tuple(s.token_ids) for s in samples}) == 3


def test_later_samples_hold_the_first_samples_prompt_blocks_until_aborted(demo_core) -> None:
    core = demo_core(num_kv_blocks=64)
    core.add_request(EngineRequest("r", PROMPT, replace(GREEDY, n=3, max_tokens=40)))
    core.step()  # the first sample computes the prompt; the others wait for it
    first, *later = core.sequences["r"]
    assert [s.status.value for s in later] == ["waiting", "waiting"]
    core.step()
    prompt_blocks = first.block_ids[: SHARED // 16]
    assert all(s.block_ids[: SHARED // 16] == prompt_blocks for s in later)
    assert [core.pool.ref_counts[b] for b in prompt_blocks] == [3] * len(prompt_blocks)
    assert len({s.block_ids[SHARED // 16] for s in core.sequences["r"]}) == 3  # own tails
    core.abort_request("r")
    assert not core.sequences and not core.has_work
    assert core.pool.num_free == core.pool.num_blocks and not any(core.pool.ref_counts)


def test_preempted_samples_recompute_to_the_same_tokens(demo_core) -> None:
    options = replace(GREEDY, max_tokens=48)
    alone = demo_core().run_to_completion([EngineRequest("a", PROMPT, options)])["a"].token_ids
    # 4 prompt blocks shared, and each sample grows to 8 blocks: 4 samples need 20.
    core = demo_core(num_kv_blocks=15)
    samples = core.run_to_completion([EngineRequest("r", PROMPT, replace(options, n=4))])
    assert core.scheduler.num_preemptions > 0
    assert [s.token_ids for s in samples["r"].samples] == [alone] * 4
    assert core.pool.num_free == core.pool.num_blocks and not any(core.pool.ref_counts)
