"""Speculative decoding changes nothing but speed: with the n-gram or a draft-model proposer, every
request's tokens, finish reasons, usage and logprobs, the prefix cache and its events equal those
of plain decoding, greedy and seeded alike, through stops, length limits, preemption and aborts;
and the sampled distribution is the target's."""

import itertools
import math
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.core_process import net_cache_changes
from llmserve.engine_service.core.engine_builder import build_engine
from llmserve.engine_service.core.ngram_proposer import NgramProposer
from llmserve.engine_service.demo_model import build_tokenizer, write_tokenizer
from llmserve.engine_service.seam import EngineRequest, FinishReason, SamplingOptions


def repetitive_prompts(count: int, seed: int) -> list[list[int]]:
    """Prompts that repeat spans of themselves, so prompt lookup finds drafts."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        span = [rng.randrange(3, 600) for _ in range(rng.randrange(3, 12))]
        prompts.append([rng.randrange(3, 600) for _ in range(rng.randrange(0, 9))]
                       + span * rng.randrange(2, 5))
    return prompts


class Close(float):
    """A logprob, equal to another within 1e-4: the verifying step computes a row in another
    batch shape than plain decoding, so fp32 sums may differ in their last bits."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float) and abs(self - other) <= 1e-4

    __hash__ = float.__hash__


OWN_NINTH = (-1,)  # stands for the ninth token of the prompt's own greedy output
OPTIONS = [
    SamplingOptions(temperature=0.0, max_tokens=30, ignore_eos=True),
    SamplingOptions(temperature=0.9, max_tokens=25, seed=11, ignore_eos=True),
    SamplingOptions(temperature=0.0, max_tokens=28, stop_token_ids=OWN_NINTH),
    SamplingOptions(temperature=0.0, max_tokens=17, ignore_eos=True, logprobs=2),
    SamplingOptions(temperature=0.5, max_tokens=21, seed=5, top_k=20, ignore_eos=True),
    # Penalties, bias and min_tokens: each verifying row counts the draft tokens before it.
    SamplingOptions(temperature=0.0, max_tokens=26, ignore_eos=True, presence_penalty=0.4,
                    frequency_penalty=0.3),
    SamplingOptions(temperature=0.7, max_tokens=22, seed=3, ignore_eos=True,
                    repetition_penalty=1.3, logit_bias=((5, 2.0), (17, -3.0))),
    SamplingOptions(temperature=0.0, max_tokens=24, min_tokens=12, stop_token_ids=OWN_NINTH),
]


def run(core, prompts: list[list[int]], abort_at: int | None = None) -> tuple[dict, list]:
    """Each request's concatenated stream (tokens, logprobs, last finish reason and usage), and
    the prefix cache's net changes and free blocks after the run. Requests whose options stop
    on OWN_NINTH stop on the ninth token of their greedy output (found by a plain run of the
    prompt alone)."""
    for i, prompt in enumerate(prompts):
        options = OPTIONS[i % len(OPTIONS)]
        if options.stop_token_ids == OWN_NINTH:
            options = replace(options, stop_token_ids=(ninth_greedy_token(core, prompt),))
        core.add_request(EngineRequest(f"r{i}", prompt, options))
    streams: dict[str, dict] = {}
    events = []
    steps = 0
    while core.has_work:
        if steps == abort_at:
            core.abort_request("r1")
        for out in core.step():
            stream = streams.setdefault(out.request_id, {"tokens": [], "logprobs": []})
            stream["tokens"] += out.new_token_ids
            if out.new_logprobs is not None:
                stream["logprobs"] += [(lp.token_id, Close(lp.logprob),
                                        [t for t, _ in lp.top]) for lp in out.new_logprobs]
            stream["end"] = (out.finish_reason, out.completion_tokens, out.prompt_tokens)
        events += core.pool.take_events()
        steps += 1
    stored, removed = net_cache_changes(events)
    return streams, [sorted(stored), sorted(removed), core.pool.num_free]


def ninth_greedy_token(core, prompt: list[int]) -> int:
    config = replace(core.config, speculative_method="none", speculative_draft_model=None,
                     num_kv_blocks=64)
    plain, _ = build_engine(config)
    tokens = plain.run_to_completion([EngineRequest("x", prompt, SamplingOptions(
        temperature=0.0, max_tokens=9, ignore_eos=True))])["x"].token_ids
    return tokens[8]


def usage(core) -> tuple[int, int]:
    return core.num_spec_proposed_total, core.num_spec_accepted_total


@pytest.mark.parametrize("k", [1, 3, 8])
def test_ngram_speculation_is_plain_decoding_token_for_token(demo_core, k) -> None:
    prompts = repetitive_prompts(16, seed=k)
    settings = {"num_kv_blocks": 512, "max_num_seqs": 8}
    plain = run(demo_core(**settings), prompts)
    core = demo_core(**settings, speculative_method="ngram", num_speculative_tokens=k)
    assert run(core, prompts) == plain
    proposed, accepted = usage(core)
    assert proposed > 50 and 0 < accepted < proposed  # drafts were kept and rejected
    ended = {stream["end"][0] for stream in plain[0].values()}
    assert FinishReason.STOP in ended and FinishReason.LENGTH in ended


def test_draft_model_speculation_is_plain_decoding_token_for_token(
        demo_core, demo_dir: Path, tiny_checkpoint) -> None:
    """The target is the tiny test model; the draft is the demo model (same tokenizer, other
    weights), so its guesses are partly right."""
    prompts = repetitive_prompts(10, seed=7)
    target = tiny_checkpoint("qwen3")
    settings = {"num_kv_blocks": 512, "max_num_seqs": 8, "device": "cpu"}
    plain = run(build_engine(EngineConfig(model=target, **settings))[0], prompts)
    core, _ = build_engine(EngineConfig(model=target, **settings, speculative_method="draft",
                                        speculative_draft_model=demo_dir,
                                        speculative_disable_batch_size=8,
                                        num_speculative_tokens=3))
    assert run(core, prompts) == plain
    proposed, accepted = usage(core)
    assert proposed > 50 and accepted < proposed
    # The draft equal to the target guesses every greedy token right.
    core = demo_core(num_kv_blocks=512, max_num_seqs=8, speculative_method="draft",
                     speculative_draft_model=demo_dir, num_speculative_tokens=4,
                     speculative_disable_batch_size=8)
    greedy = [SamplingOptions(temperature=0.0, max_tokens=30, ignore_eos=True)]
    results = core.run_to_completion(
        [EngineRequest(f"g{i}", p, greedy[0]) for i, p in enumerate(prompts[:4])])
    plain_core = demo_core(num_kv_blocks=512, max_num_seqs=8)
    again = plain_core.run_to_completion(
        [EngineRequest(f"g{i}", p, greedy[0]) for i, p in enumerate(prompts[:4])])
    assert {k: v.token_ids for k, v in results.items()} == {
        k: v.token_ids for k, v in again.items()}
    proposed, accepted = usage(core)
    assert proposed > 0 and accepted == proposed


def test_draft_loop_rows_guess_as_many_tokens_as_each_asks(demo_core, demo_dir: Path) -> None:
    """The draft's later passes run as one loop over every row; a row that asked for fewer
    guesses stops (stores no KV, keeps its position) while the others go on. With the target
    as its own draft every guess is right, so a row that wrote over another's draft KV, or
    guessed past its count, would show as a rejected or surplus guess."""
    prompts = repetitive_prompts(7, seed=13)
    settings = {"num_kv_blocks": 256, "max_num_seqs": 8}
    asks = [1, 2, 3, None, 2, 1, None]
    requests = [EngineRequest(f"m{i}", p, SamplingOptions(
        temperature=0.0, max_tokens=19 + i, ignore_eos=True, speculative_tokens=k))
        for i, (p, k) in enumerate(zip(prompts, asks, strict=True))]
    plain = demo_core(**settings).run_to_completion(requests)
    core = demo_core(**settings, speculative_method="draft", speculative_draft_model=demo_dir,
                     num_speculative_tokens=4, speculative_disable_batch_size=8)
    outputs: list = []
    results = core.run_to_completion(requests, on_step=outputs.append)
    assert {k: v.token_ids for k, v in results.items()} == {
        k: v.token_ids for k, v in plain.items()}
    proposed, accepted = usage(core)
    assert proposed > 0 and accepted == proposed
    for i, k in enumerate(asks):
        gains = [len(o.new_token_ids) for step in outputs for o in step
                 if o.request_id == f"m{i}"]
        assert max(gains) == 1 + (k or 4)


def test_drafts_shorten_where_guesses_miss_and_stay_long_where_they_are_kept(
        demo_dir: Path, tiny_checkpoint) -> None:
    """With a guess's cost counted, a draft model that misses often (the demo model drafting
    for the tiny test model) proposes short drafts; one whose every guess is kept (the target
    as its own draft, greedy) keeps proposing all k. Outputs stay plain decoding's."""
    prompts = repetitive_prompts(6, seed=21)
    target = tiny_checkpoint("qwen3")
    settings = {"num_kv_blocks": 512, "max_num_seqs": 8, "device": "cpu"}
    spec = {"speculative_method": "draft", "speculative_draft_model": demo_dir,
            "speculative_disable_batch_size": 8, "num_speculative_tokens": 6}
    plain = run(build_engine(EngineConfig(model=target, **settings))[0], prompts)
    core, _ = build_engine(EngineConfig(model=target, **settings, **spec))
    core.speculator.proposer.guess_cost = 0.3
    assert run(core, prompts) == plain
    proposed, accepted = usage(core)
    assert accepted < proposed and proposed / core.num_spec_drafts_total < 3
    core, _ = build_engine(EngineConfig(model=demo_dir, **settings, **spec))
    core.speculator.proposer.guess_cost = 0.3
    greedy = SamplingOptions(temperature=0.0, max_tokens=150, ignore_eos=True)
    core.run_to_completion([EngineRequest(f"g{i}", p, greedy) for i, p in enumerate(prompts)])
    proposed, accepted = usage(core)
    assert accepted == proposed and proposed / core.num_spec_drafts_total > 5


def test_drafts_proposed_ahead_are_taken_unless_the_next_step_differs(
        demo_core, demo_dir: Path) -> None:
    """After a verifying step the next drafts are proposed at once (the draft runs while the
    host streams and plans); the next step takes them, each round one proposal. A request
    arriving in between changes the step: it proposes again, and outputs stay plain
    decoding's."""
    prompts = repetitive_prompts(2, seed=17)
    greedy = SamplingOptions(temperature=0.0, max_tokens=40, ignore_eos=True)
    settings = {"num_kv_blocks": 512, "max_num_seqs": 8}

    def serve(core) -> dict[str, list[int]]:
        tokens: dict[str, list[int]] = {}
        core.add_request(EngineRequest("first", prompts[0], greedy))
        for step in itertools.count():
            if step == 6:
                core.add_request(EngineRequest("second", prompts[1], greedy))
            for out in core.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if not core.has_work:
                return tokens

    plain = serve(demo_core(**settings))
    core = demo_core(**settings, speculative_method="draft", speculative_draft_model=demo_dir,
                     speculative_disable_batch_size=2)
    calls: list[int] = []
    propose = core.speculator.proposer.propose

    def counted(seqs, ks):
        calls.append(len(seqs))
        return propose(seqs, ks)

    core.speculator.proposer.propose = counted
    assert serve(core) == plain
    rounds = core.num_spec_drafts_total  # sequence-steps that verified a draft
    # One proposal per verifying step, plus the first and the one the new request forced
    # (and none for a step after the last).
    assert rounds > 10 and sum(calls) <= rounds + 2 * len(prompts) + 1


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculation_survives_preemption_and_aborts(demo_core, demo_dir: Path, method) -> None:
    """A pool too small for every sequence preempts some mid-run (their drafts' KV with them);
    an abort mid-run frees its sequence. The others' streams are unchanged."""
    prompts = repetitive_prompts(8, seed=3)
    settings = {"num_kv_blocks": 14, "max_num_seqs": 8}
    extra = {"speculative_draft_model": demo_dir} if method == "draft" else {}
    plain_core = demo_core(**settings)
    plain, _ = run(plain_core, prompts, abort_at=5)
    core = demo_core(**settings, speculative_method=method, speculative_disable_batch_size=8,
                     **extra)
    streams, (_, _, free) = run(core, prompts, abort_at=5)
    assert core.scheduler.num_preemptions > 0
    assert free == core.pool.num_blocks and not any(core.pool.ref_counts)
    del plain["r1"], streams["r1"]
    assert streams == plain


def test_async_scheduling_with_speculation_matches_plain(demo_core) -> None:
    prompts = repetitive_prompts(6, seed=5)
    plain = run(demo_core(num_kv_blocks=512, max_num_seqs=8), prompts)
    core = demo_core(num_kv_blocks=512, max_num_seqs=8, async_scheduling=True,
                     speculative_method="ngram", speculative_disable_batch_size=3)
    assert run(core, prompts) == plain
    assert usage(core)[0] > 0  # it speculated once few enough sequences were left


def test_request_opt_out_and_the_batch_size_limit(demo_core) -> None:
    prompts = repetitive_prompts(4, seed=9)
    off = SamplingOptions(temperature=0.0, max_tokens=20, ignore_eos=True, speculative_tokens=0)
    core = demo_core(speculative_method="ngram")
    results = core.run_to_completion([EngineRequest(f"o{i}", p, off)
                                      for i, p in enumerate(prompts)])
    assert usage(core) == (0, 0)
    assert all(r.token_ids for r in results.values())
    # Three running sequences, speculation only once at most two run: after the short one.
    core = demo_core(speculative_method="ngram", speculative_disable_batch_size=2)
    greedy = replace(off, speculative_tokens=None)
    requests = [EngineRequest(f"o{i}", p, greedy) for i, p in enumerate(prompts[:3])]
    requests[0] = replace(requests[0], sampling=replace(greedy, max_tokens=4))
    outputs = []
    core.run_to_completion(requests, on_step=outputs.append)
    short_ends = next(n for n, step in enumerate(outputs)
                      if any(out.request_id == "o0" and out.finish_reason for out in step))
    assert all(len(out.new_token_ids) == 1 for step in outputs[: short_ends + 1] for out in step)
    assert usage(core)[0] > 0
    # A request asking for fewer tokens than the engine proposes gets at most that many.
    core = demo_core(speculative_method="ngram", num_speculative_tokens=6)
    one = replace(greedy, speculative_tokens=1)
    outputs = []
    core.run_to_completion([EngineRequest("one", prompts[0], one)], on_step=outputs.append)
    assert max(len(out.new_token_ids) for step in outputs for out in step) <= 2
    last = [out for step in outputs for out in step][-1]
    assert last.spec_proposed_tokens == usage(core)[0] > 0
    assert last.spec_accepted_tokens == usage(core)[1]


def test_ngram_lookup_prefers_the_longest_latest_match() -> None:
    proposer = NgramProposer(2, 4)
    assert proposer.lookup([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert proposer.lookup([1, 2, 9, 9, 7, 1, 2, 8, 5, 1, 2], 2) == [8, 5]  # latest of 1, 2
    # The 3-gram 5, 1, 2 recurs earlier than the latest 2-gram 1, 2: the longer one wins.
    assert proposer.lookup([5, 1, 2, 6, 0, 1, 2, 7, 5, 1, 2], 1) == [6]
    assert proposer.lookup([1, 2, 3], 2) == [] and proposer.lookup([4, 4], 3) == []
    assert NgramProposer(1, 1).lookup([3, 1, 3], 2) == [1, 3]


def test_sampled_tokens_follow_the_targets_distribution(demo_core, demo_dir: Path,
                                                        teacher_forced) -> None:
    """Chi-square over many seeded draws: the first token, and the second (drawn in the step
    that verifies the first guess) after the most frequent first, against the model's own
    probabilities. The draft is the target itself, guessing greedily: at a low temperature its
    guess is the likeliest token, kept often and rejected often.
    """
    prompt = [11, 12, 13, 14, 15, 16, 17, 11, 12, 13]
    draws = 1500
    options = SamplingOptions(temperature=0.35, max_tokens=3, ignore_eos=True)
    core = demo_core(speculative_method="draft", speculative_draft_model=demo_dir,
                     num_speculative_tokens=3, speculative_disable_batch_size=draws,
                     max_num_seqs=256)
    results = core.run_to_completion([EngineRequest(f"s{i}", prompt, replace(options, seed=i))
                                      for i in range(draws)])
    first = Counter(r.token_ids[0] for r in results.values())
    proposed, accepted = usage(core)
    assert accepted > 100 and proposed - accepted > 100  # kept often and rejected often
    # The second token's distribution after the most frequent first token.
    head = first.most_common(1)[0][0]
    seconds = Counter(r.token_ids[1] for r in results.values() if r.token_ids[0] == head)
    logits = teacher_forced(demo_core(), [prompt], [[head, 0]])[0]
    probs = torch.softmax(logits / options.temperature, dim=-1)
    for counts, p in ((first, probs[0]), (seconds, probs[1])):
        statistic, dof = chi_square(counts, p, sum(counts.values()))
        # Beyond the 0.999 quantile of chi-square(dof) (Wilson-Hilferty) only by a bug.
        z = 3.09
        limit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
        assert statistic < limit, (statistic, dof, limit)


def chi_square(counts: Counter, probs: torch.Tensor, total: int) -> tuple[float, int]:
    """Pearson's statistic over the tokens expected at least 5 times (the rest pooled)."""
    expected = probs * total
    keep = [int(t) for t in torch.nonzero(expected >= 5).flatten()]
    statistic, pooled_obs, pooled_exp = 0.0, total, float(total)
    for token in keep:
        e = float(expected[token])
        statistic += (counts.get(token, 0) - e) ** 2 / e
        pooled_obs -= counts.get(token, 0)
        pooled_exp -= e
    if pooled_exp >= 5:
        statistic += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        return statistic, len(keep)
    return statistic, max(1, len(keep) - 1)


def test_bad_configurations_stop_start_up(demo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"num.speculative.tokens"):
        EngineConfig(model=demo_dir, speculative_method="ngram", num_speculative_tokens=17)
    with pytest.raises(ValueError, match="speculative-draft-model"):
        EngineConfig(model=demo_dir, speculative_method="draft")
    with pytest.raises(ValueError, match="ngram-prompt-lookup-min"):
        EngineConfig(model=demo_dir, ngram_prompt_lookup_min=5, ngram_prompt_lookup_max=3)
    # A draft with another tokenizer: its ids mean other tokens.
    other = tmp_path / "other-vocab"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((demo_dir / name).read_bytes())
    write_tokenizer(build_tokenizer(vocab_size=300), other, 512)
    with pytest.raises(ValueError, match="vocabulary"):
        build_engine(EngineConfig(model=demo_dir, device="cpu", speculative_method="draft",
                                  speculative_draft_model=other))


def test_a_draft_catching_up_over_several_steps_computes_every_position(demo_core,
                                                                        demo_dir: Path) -> None:
    """A draft pass holds at most a step's tokens, so a long prompt's catch-up takes several
    steps before the draft guesses; with the target as its own draft every greedy guess is then
    kept, which a position the draft skipped would break."""
    prompt = [(13 * i) % 500 + 3 for i in range(45)]  # three 16-token catch-up passes
    core = demo_core(max_num_batched_tokens=16, max_num_seqs=8, speculative_method="draft",
                     speculative_draft_model=demo_dir, speculative_disable_batch_size=8)
    options = SamplingOptions(temperature=0.0, max_tokens=24, ignore_eos=True)
    result = core.run_to_completion([EngineRequest("long", prompt, options)])["long"]
    plain = demo_core(max_num_batched_tokens=16, max_num_seqs=8).run_to_completion(
        [EngineRequest("long", prompt, options)])["long"]
    assert result.token_ids == plain.token_ids
    proposed, accepted = usage(core)
    assert proposed > 0 and accepted == proposed
