"""Tensor parallelism on GPUs: the distributed path (NCCL, the rank step channel) at TP=1 gives
the in-process runner's tokens; on two GPUs, TP=2 gives TP=1's (fp32 exactly, bf16 within the
GPU engine's criterion)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def run(make_core, model_dir, action, **settings):
    core = make_core(model_dir, **settings)
    try:
        return action(core)
    finally:
        core.runner.shutdown()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_distributed_path_at_tp1_gives_the_in_process_tokens(
    dtype, qwen3_hd128, make_core, greedy, prompts
) -> None:
    def tokens(core):
        assert core.runner.graphs is not None
        return greedy(core, prompts, 16, True)

    plain = run(make_core, qwen3_hd128, tokens, dtype=dtype)
    assert run(make_core, qwen3_hd128, tokens, dtype=dtype, distributed=True) == plain


@TWO_GPUS
def test_tp2_fp32_tokens_equal_tp1(qwen3_hd128, make_core, greedy, prompts) -> None:
    def tokens(core):
        return greedy(core, prompts, 16, True)

    one = run(make_core, qwen3_hd128, tokens, dtype="float32")
    assert run(make_core, qwen3_hd128, tokens, dtype="float32", tensor_parallel_size=2) == one


@TWO_GPUS
def test_tp2_bf16_logits_within_criterion_of_tp1(
    qwen3_hd128, make_core, greedy, teacher_forced, prompts
) -> None:
    one_tokens = run(make_core, qwen3_hd128, lambda c: greedy(c, prompts, 12, True))
    one = run(make_core, qwen3_hd128, lambda c: teacher_forced(c, prompts, one_tokens))
    two = run(make_core, qwen3_hd128, lambda c: teacher_forced(c, prompts, one_tokens),
              tensor_parallel_size=2)
    two_tokens = run(make_core, qwen3_hd128, lambda c: greedy(c, prompts, 12, True),
                     tensor_parallel_size=2)
    for i in range(len(prompts)):
        errors = (two[i] - one[i]).norm(dim=-1) / one[i].norm(dim=-1)
        assert float(errors.max()) < 2e-2, f"prompt {i}: {errors.tolist()}"
        top2 = one[i].topk(2, dim=-1).values
        close = (top2[:, 0] - top2[:, 1] < 0.05).nonzero()
        agree_until = int(close[0]) if len(close) else len(one_tokens[i])
        assert two_tokens[i][:agree_until] == one_tokens[i][:agree_until], f"prompt {i}"
