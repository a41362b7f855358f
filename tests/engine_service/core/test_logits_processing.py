"""Penalties, logit_bias and min_tokens through a real engine core on the tiny Qwen3 checkpoint:
greedy tokens as transformers' generate draws them with the definitions as its logits
processor, batched with other requests under async scheduling, through preemption, and nothing
built for a batch that asks for none of them."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from llmserve.engine_service.runner.logits_processors import LogitsProcessors
from llmserve.engine_service.seam import EngineRequest, FinishReason, SamplingOptions

PROMPTS = [[5, 17, 99, 230, 7], [400, 12], list(range(40, 77)), [3] * 20, [9, 8, 7] * 11]
NEW_TOKENS = 16


class Definitions(transformers.LogitsProcessor):
    """min_tokens, logit_bias and the three penalties from their definitions (batch of one)."""

    def __init__(self, options: SamplingOptions, prompt_len: int, eos: int) -> None:
        self.options, self.prompt_len, self.eos = options, prompt_len, eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        o, row = self.options, scores[0].clone()
        tokens = input_ids[0].tolist()
        output = tokens[self.prompt_len :]
        if len(output) < o.min_tokens:
            for token in (*o.stop_token_ids, *(() if o.ignore_eos else (self.eos,))):
                row[token] = float("-inf")
        for token, bias in o.logit_bias:
            row[token] += bias
        for token in set(tokens):
            row[token] = (row[token] / o.repetition_penalty if row[token] > 0
                          else row[token] * o.repetition_penalty)
        for token in set(output):
            row[token] -= o.frequency_penalty * output.count(token) + o.presence_penalty
        return row[None]


def transformers_greedy(hf, prompt: list[int], options: SamplingOptions, eos: int) -> list[int]:
    stops = [*options.stop_token_ids, *(() if options.ignore_eos else (eos,))]
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=options.max_tokens, do_sample=False,
            eos_token_id=stops or None, pad_token_id=0,
            logits_processor=transformers.LogitsProcessorList(
                [Definitions(options, len(prompt), eos)]),
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def qwen3(tiny_checkpoint: Callable[[str], Path]) -> tuple[Path, transformers.PreTrainedModel]:
    model_dir = tiny_checkpoint("qwen3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model_dir, hf.eval()


def greedy(**fields: object) -> SamplingOptions:
    return SamplingOptions(**{"temperature": 0.0, "max_tokens": NEW_TOKENS, **fields})


def test_greedy_tokens_match_transformers_with_the_definitions(qwen3, make_core) -> None:
    model_dir, hf = qwen3
    eos = hf.generation_config.eos_token_id
    options = [
        greedy(repetition_penalty=1.8, ignore_eos=True),
        greedy(presence_penalty=1.5, frequency_penalty=0.7, ignore_eos=True),
        greedy(logit_bias=((11, 6.0), (12, 5.5), (300, -100.0)), repetition_penalty=0.7,
               ignore_eos=True),
        greedy(),  # no processing, beside the others
        greedy(frequency_penalty=-0.5, presence_penalty=2.0, repetition_penalty=1.2,
               min_tokens=4, logit_bias=((eos, 30.0),)),
    ]
    # Overlapped steps: a step's counts include the token the step before drew, unread.
    core = make_core(model_dir, async_scheduling=True)
    pairs = enumerate(zip(PROMPTS, options, strict=True))
    results = core.run_to_completion([EngineRequest(f"r{i}", p, o) for i, (p, o) in pairs])
    plain = core.run_to_completion(
        [EngineRequest(f"p{i}", p, greedy(ignore_eos=True)) for i, p in enumerate(PROMPTS)])
    for i, (prompt, o) in enumerate(zip(PROMPTS, options, strict=True)):
        expected = transformers_greedy(hf, prompt, o, eos)
        assert results[f"r{i}"].token_ids == expected, f"request {i}: {o}"
        if o.processes_logits:
            assert expected != plain[f"p{i}"].token_ids[: len(expected)], f"request {i}"
    # The eos bias wins from the 5th token on, not before.
    assert results["r4"].token_ids[-1] == eos and len(results["r4"].token_ids) == 5
    assert core.logits_processors.state.num_held == 0  # every slot given back


def test_logit_bias_forces_and_bans_tokens(qwen3, make_core) -> None:
    model_dir, _ = qwen3
    core = make_core(model_dir)
    first = core.run_to_completion([EngineRequest("a", PROMPTS[0], greedy(ignore_eos=True))])
    banned = first["a"].token_ids[0]
    results = core.run_to_completion([
        EngineRequest("forced", PROMPTS[0], greedy(logit_bias=((123, 100.0),), max_tokens=6)),
        EngineRequest("banned", PROMPTS[0],
                      greedy(logit_bias=((banned, -100.0),), ignore_eos=True)),
        # Sampled too: +100 leaves every other token e^-100 behind.
        EngineRequest("sampled", PROMPTS[1], SamplingOptions(
            temperature=1.0, top_p=0.95, seed=5, max_tokens=6, logit_bias=((77, 100.0),))),
    ])
    assert results["forced"].token_ids == [123] * 6
    assert results["sampled"].token_ids == [77] * 6
    assert banned not in results["banned"].token_ids


def test_min_tokens_holds_off_a_stop_token_greedy_draws_early(qwen3, make_core) -> None:
    model_dir, _ = qwen3
    core = make_core(model_dir)
    free = core.run_to_completion([EngineRequest("a", PROMPTS[2], greedy(ignore_eos=True))])
    stop = free["a"].token_ids[1]
    results = core.run_to_completion([
        EngineRequest("early", PROMPTS[2], greedy(stop_token_ids=(stop,), ignore_eos=True)),
        EngineRequest("held", PROMPTS[2],
                      greedy(stop_token_ids=(stop,), ignore_eos=True, min_tokens=8)),
    ])
    early, held = results["early"], results["held"]
    assert early.token_ids[-1] == stop and len(early.token_ids) <= 2
    assert early.finish_reason == FinishReason.STOP
    assert stop not in held.token_ids[:8]
    assert len(held.token_ids) >= 8


def test_preempted_requests_recount_to_the_same_tokens(demo_core) -> None:
    """Recomputed after a preemption, a request's counts come back from its tokens: its tokens
    (greedy and seeded) are those it draws alone."""
    options = [
        SamplingOptions(temperature=0.0, max_tokens=48, ignore_eos=True,
                        repetition_penalty=1.5, frequency_penalty=0.4),
        SamplingOptions(temperature=0.9, seed=3, max_tokens=48, ignore_eos=True,
                        presence_penalty=1.0, logit_bias=((7, 2.0),)),
        SamplingOptions(temperature=0.0, max_tokens=48, ignore_eos=True, frequency_penalty=1.0),
    ]
    prompts = {f"batch{i}": [20 + i] * 60 for i in range(3)}
    alone = {}
    for (name, prompt), o in zip(prompts.items(), options, strict=True):
        core = demo_core(num_kv_blocks=64)
        alone[name] = core.run_to_completion([EngineRequest(name, prompt, o)])[name].token_ids
    core = demo_core(num_kv_blocks=14)  # 224 tokens: the three cannot all run to their end
    together = core.run_to_completion(
        [EngineRequest(name, prompt, o)
         for (name, prompt), o in zip(prompts.items(), options, strict=True)])
    assert core.scheduler.num_preemptions > 0
    assert {name: r.token_ids for name, r in together.items()} == alone


def test_a_batch_that_asks_for_nothing_builds_nothing(demo_core, monkeypatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("prepare() called for a batch that asks for nothing")

    monkeypatch.setattr(LogitsProcessors, "prepare", refuse)
    core = demo_core(num_kv_blocks=64)
    core.run_to_completion([
        EngineRequest("a", [5, 6, 7], SamplingOptions(temperature=0.0, max_tokens=4)),
        EngineRequest("b", [8, 9], SamplingOptions(temperature=0.7, top_k=5, max_tokens=4)),
    ])
    assert core.logits_processors.state.capacity == 0  # no table allocated either


def test_a_failed_over_stream_keeps_its_penalty_counts(demo_core) -> None:
    """A router resumes a stream elsewhere with the output so far appended to the prompt and
    `resumed_output_tokens` saying so: the penalties still count that output as output."""
    options = SamplingOptions(temperature=0.0, max_tokens=24, ignore_eos=True,
                              presence_penalty=1.5, frequency_penalty=2.0)
    prompt = [5, 17, 99, 230, 7]
    core = demo_core()
    whole = core.run_to_completion([EngineRequest("a", prompt, options)])["a"].token_ids
    cut = 8
    resumed = core.run_to_completion([EngineRequest(
        "b", prompt + whole[:cut],
        SamplingOptions(temperature=0.0, max_tokens=24 - cut, ignore_eos=True,
                        presence_penalty=1.5, frequency_penalty=2.0),
        resumed_output_tokens=cut)])["b"].token_ids
    assert whole[:cut] + resumed == whole

