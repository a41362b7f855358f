"""Tensor parallelism on the CPU: two gloo ranks give TP=1's greedy tokens through gRPC, and a
rank that dies ends the engine cleanly."""

import urllib.request

import grpc
import pytest

from llmserve.common.ports import ephemeral_port
from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.engine_builder import build_engine
from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc

PROMPTS = [[5, 6, 7], list(range(10, 60)), [300 + i % 17 for i in range(70)], [42] * 33]


def greedy(prompt: list[int], max_tokens: int) -> engine_service_pb2.EngineServiceGenerateRequest:
    return engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(temperature=0.0),
        stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
    )


def generate_all(address: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    with grpc.insecure_channel(address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        calls = [stub.Generate(greedy(p, max_tokens), timeout=120) for p in prompts]
        return [[t for r in call for t in r.token_ids] for call in calls]


@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_two_ranks_give_the_tokens_of_one(tiny_checkpoint, start_engine, architecture) -> None:
    model = tiny_checkpoint(architecture)
    one = start_engine(model)
    two = start_engine(model, "--tensor-parallel-size", "2")
    expected = generate_all(one.address, PROMPTS, 24)
    assert all(len(tokens) == 24 for tokens in expected)
    # Batched together (prefill + decode in the same steps), then one at a time.
    assert generate_all(two.address, PROMPTS, 24) == expected
    assert [generate_all(two.address, [p], 24)[0] for p in PROMPTS[:2]] == expected[:2]
    joined = [e for e in two.log_events() if e.get("event") == "tensor_parallel_rank_ready"]
    assert [e["tp_rank"] for e in joined] == [1]


def test_two_ranks_score_the_prompt_as_one(tiny_checkpoint, start_engine) -> None:
    model = tiny_checkpoint("qwen3")
    # 16-token steps and LM head passes of 4 rows: prompts scored over chunks and slices, each
    # slice a gather over both ranks, beside requests that do not ask.
    flags = ("--max-num-batched-tokens", "16", "--max-num-seqs", "4")
    engines = [start_engine(model, *flags), start_engine(model, *flags, "-tp", "2")]
    answers = []
    for engine in engines:
        requests = [greedy(p, 4) for p in PROMPTS]
        for request in requests[::2]:
            request.sampling.prompt_logprobs = 3
        with grpc.insecure_channel(engine.address) as channel:
            stub = engine_service_pb2_grpc.EngineServiceStub(channel)
            # All sent before any is read: batched together.
            streams = [stub.Generate(request, timeout=120) for request in requests]
            calls = [list(stream) for stream in streams]
        answers.append([
            ([t for r in call for t in r.token_ids],
             [(lp.token_id, lp.logprob, [t.token_id for t in lp.top_logprobs])
              for r in call for lp in r.prompt_logprobs])
            for call in calls])
    for prompt, one, two in zip(PROMPTS, *answers, strict=True):
        assert one[0] == two[0]
        assert len(one[1]) == (len(prompt) - 1 if prompt in PROMPTS[::2] else 0)
        for (token, logprob, top), (token2, logprob2, top2) in zip(one[1], two[1], strict=True):
            assert (token, top) == (token2, top2) and logprob2 == pytest.approx(logprob, abs=1e-4)


def test_a_size_that_does_not_divide_the_kv_heads_is_refused(tiny_checkpoint) -> None:
    config = EngineConfig(model=tiny_checkpoint("qwen3"), tensor_parallel_size=3)
    refusal = r"does not divide .* 2 KV heads.*supported sizes: \[1, 2\]"
    with pytest.raises(ValueError, match=refusal):
        build_engine(config)


def test_a_dead_rank_ends_the_engine(tiny_checkpoint, start_engine, engine_dies_cleanly) -> None:
    engine = start_engine(tiny_checkpoint("qwen3"), "--tensor-parallel-size", "2")
    victim = engine_dies_cleanly(engine, "tensor_parallel_rank_started")
    died = [e for e in engine.log_events() if e.get("event") == "tensor_parallel_rank_died"]
    assert died and died[0]["rank"] == victim["rank"] == 1


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_two_ranks_speculate_as_one(tiny_checkpoint, start_engine, method) -> None:
    """Verifying steps (several logits rows per sequence) on both ranks; a draft model on rank 0
    alone, unsharded, beside the target's two shards."""
    model = tiny_checkpoint("qwen3")
    extra = ("--speculative-draft-model", str(model)) if method == "draft" else ()
    metrics_port = ephemeral_port()
    one = start_engine(model)
    two = start_engine(model, "-tp", "2", "--speculative-method", method, *extra,
                       "--speculative-disable-batch-size", "8",
                       "--metrics-port", str(metrics_port))
    prompts = [p * 2 for p in PROMPTS]  # repeats for prompt lookup to find
    expected = generate_all(one.address, prompts, 24)
    assert generate_all(two.address, prompts, 24) == expected
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                     timeout=10).read().decode()
    accepted = next(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("llmserve_engine_speculative_accepted_tokens_total "))
    assert accepted > 0



def test_two_ranks_with_an_e4m3_kv_cache_give_the_tokens_of_one(
        tiny_checkpoint, start_engine) -> None:
    """Each rank stores its own KV heads, each row with its own scale: the same codes and
    scales as one rank's, so the same tokens."""
    model = tiny_checkpoint("qwen3")
    one = start_engine(model, "--kv-cache-dtype", "fp8_e4m3")
    two = start_engine(model, "-tp", "2", "--kv-cache-dtype", "fp8_e4m3")
    expected = generate_all(one.address, PROMPTS, 24)
    assert all(len(tokens) == 24 for tokens in expected)
    assert generate_all(two.address, PROMPTS, 24) == expected
