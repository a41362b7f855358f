"""The CUDA engine (Triton kernels or flash-attn 4, CUDA-graph decode) against transformers.

fp32: greedy tokens equal transformers' greedy `generate`. bf16: teacher-forced logits over
transformers' greedy tokens within 2e-2 (norm-wise) at every position, and our greedy tokens
equal its tokens up to the first position where its top-2 logit gap is below 0.05. Eager and
graph decode give identical tokens.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

from llmserve.engine_service.attention.layer import BackendUnavailableError
from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.engine_builder import build_engine

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HAVE_FA4 = importlib.util.find_spec("flash_attn") is not None
FLASH_ATTN = pytest.param("flash_attn", marks=pytest.mark.skipif(
    not HAVE_FA4, reason="flash-attn 4 is not installed"))
NEW_TOKENS = 12


def hf_model(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to("cuda").eval()


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def hf_logits(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), vocab] that predicted each of `tokens` after `prompt`."""
    logits = model(torch.tensor([prompt + tokens], device="cuda")).logits[0].float().cpu()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_fp32_greedy_equals_transformers_with_cuda_graphs(
    architecture, tiny_checkpoint, make_core, greedy, prompts
) -> None:
    # flash-attn 4 runs bf16/fp16 only: in fp32 the Triton backend is the one to check.
    model_dir = tiny_checkpoint(architecture)
    core = make_core(model_dir, dtype="float32", attention_backend="triton")
    assert core.runner.graphs is not None and core.runner.graphs.sizes == [1, 2, 4, 8]
    ours = greedy(core, prompts, NEW_TOKENS)
    hf = hf_model(model_dir, torch.float32)
    for i, prompt in enumerate(prompts):
        assert ours[i] == hf_greedy(hf, prompt, NEW_TOKENS), f"prompt {i}"


@pytest.mark.parametrize(("backend", "checkpoint"), [
    ("triton", "tiny"), ("triton", "hd128"),
    pytest.param("flash_attn", "hd128", marks=FLASH_ATTN.marks, id="flash_attn-hd128")])
def test_bf16_logits_and_greedy_prefix_match_transformers(
    backend, checkpoint, tiny_checkpoint, qwen3_hd128, make_core, greedy, teacher_forced,
    prompts
) -> None:
    """Within 2e-2 of transformers' bf16 logits at every position, and its greedy tokens up to
    its first near-tie."""
    model_dir = tiny_checkpoint("qwen3") if checkpoint == "tiny" else qwen3_hd128
    hf = hf_model(model_dir, torch.bfloat16)
    reference = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    core = make_core(model_dir, attention_backend=backend)
    assert core.runner.dtype == torch.bfloat16 and core.runner.graphs is not None
    ours_logits = teacher_forced(core, prompts, reference)
    ours_tokens = greedy(core, prompts, NEW_TOKENS)
    for i, prompt in enumerate(prompts):
        ref = hf_logits(hf, prompt, reference[i])
        errors = (ours_logits[i] - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert float(errors.max()) < 2e-2, f"prompt {i}: {errors.tolist()}"
        top2 = ref.topk(2, dim=-1).values
        close = (top2[:, 0] - top2[:, 1] < 0.05).nonzero()
        agree_until = int(close[0]) if len(close) else len(reference[i])
        assert ours_tokens[i][:agree_until] == reference[i][:agree_until], f"prompt {i}"


@pytest.mark.parametrize("backend", ["triton", FLASH_ATTN])
def test_eager_and_graph_decode_give_identical_tokens(
    backend, qwen3_hd128, make_core, greedy, prompts
) -> None:
    # 4 and 8 sequences prefilled in one step, so every decode step fills a captured size
    # exactly and both paths run the same shapes (padding changes the matmuls' row count,
    # which may change cuBLAS' choice of kernel and so the last bits).
    batch = prompts[:4] + [p[::-1] for p in prompts[:4]]
    for group in (batch[:4], batch):
        runs = [greedy(make_core(qwen3_hd128, attention_backend=backend, enforce_eager=eager,
                                 max_num_batched_tokens=256), group, 24, True)
                for eager in (False, True)]
        assert runs[0] == runs[1]


def test_kv_cache_sized_from_gpu_memory_utilization(tiny_checkpoint, greedy, prompts) -> None:
    model_dir = tiny_checkpoint("qwen3")
    core, info = build_engine(EngineConfig(model=model_dir, gpu_memory_utilization=0.03,
                                           max_num_seqs=8, cuda_graph_max_bs=8))
    total = torch.cuda.mem_get_info()[1]
    block_bytes = core.runner.kv_bytes_per_block(core.runner.spec, torch.bfloat16, 16)
    assert info.device.startswith("cuda") and info.attention_backend == "triton"
    assert 0 < info.num_blocks * block_bytes < 0.03 * total
    assert all(len(t) == 4 for t in greedy(core, prompts, 4, True))


def test_torch_backend_refuses_cuda_graphs(tiny_checkpoint) -> None:
    with pytest.raises(BackendUnavailableError, match="enforce-eager"):
        build_engine(EngineConfig(model=tiny_checkpoint("qwen3"), attention_backend="torch",
                                  num_kv_blocks=64))


def test_per_phase_backends(qwen3_hd128, make_core, greedy, prompts) -> None:
    decode = "flash_attn" if HAVE_FA4 else "triton"
    core = make_core(qwen3_hd128, prefill_backend="triton", decode_backend=decode)
    expected = "triton" if decode == "triton" else "prefill=triton,decode=flash_attn"
    assert core.runner.attention.name == expected
    assert [len(t) for t in greedy(core, prompts, 8, True)] == [8] * len(prompts)


def test_cuda_defaults_to_bf16_and_triton(tiny_checkpoint) -> None:
    _, info = build_engine(EngineConfig(model=tiny_checkpoint("llama"), num_kv_blocks=128,
                                        max_num_seqs=4))
    assert (info.dtype, info.attention_backend) == ("bfloat16", "triton")


def test_fp32_penalties_bias_and_min_tokens_equal_the_cpu_engine(
    tiny_checkpoint, make_core, prompts
) -> None:
    """The penalties (the Triton kernel), logit_bias and min_tokens under CUDA graphs and async
    scheduling draw the CPU engine's greedy tokens (the torch twins, no overlap)."""
    from llmserve.engine_service.seam import EngineRequest, SamplingOptions

    model_dir = tiny_checkpoint("qwen3")
    options = [
        SamplingOptions(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.8),
        SamplingOptions(temperature=0.0, max_tokens=16, ignore_eos=True, presence_penalty=1.5,
                        frequency_penalty=0.7),
        SamplingOptions(temperature=0.0, max_tokens=16, ignore_eos=True,
                        logit_bias=((11, 6.0), (12, 5.5)), repetition_penalty=0.7),
        SamplingOptions(temperature=0.0, max_tokens=16),
        SamplingOptions(temperature=0.0, max_tokens=16, frequency_penalty=-0.5, min_tokens=4,
                        stop_token_ids=(11,), logit_bias=((11, 30.0),)),
    ]

    def run(core) -> dict[str, list[int]]:
        requests = [EngineRequest(f"r{i}", p, o)
                    for i, (p, o) in enumerate(zip(prompts, options, strict=True))]
        return {k: r.token_ids for k, r in core.run_to_completion(requests).items()}

    cuda = make_core(model_dir, dtype="float32", attention_backend="triton")
    assert cuda.config.async_scheduling and cuda.runner.graphs is not None
    ours = run(cuda)
    assert cuda.logits_processors.state.counts.is_cuda
    assert ours == run(make_core(model_dir, device="cpu"))
