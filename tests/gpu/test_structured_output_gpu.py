"""Structured output on CUDA: the pinned host masks, their copy to the device, the device-side
unpacking and the one-pass Gumbel kernel over -inf logits, under async scheduling (a constrained
row reads the step in flight before its draw): every finished output fully matches its regex,
and unconstrained rows beside them still run to their length."""

import re

import pytest
import torch
from tokenizers import Tokenizer

from llmserve.engine_service.seam import (
    EngineRequest,
    FinishReason,
    SamplingOptions,
    StructuredOutputSpec,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REGEX = r"[a-z]{2,6}-[0-9]{2,4}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_constrained_outputs_on_cuda(tiny_checkpoint, make_core, dtype: str) -> None:
    model_dir = tiny_checkpoint("qwen3")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    constraint = StructuredOutputSpec("regex", REGEX)
    requests = [EngineRequest(f"r{seed}", [5, 6, 7 + seed], SamplingOptions(
        temperature=1.0, seed=seed, max_tokens=24, structured_output=constraint))
        for seed in range(6)]
    requests += [EngineRequest(f"p{seed}", [9, 9, seed], SamplingOptions(
        temperature=1.0, seed=seed, max_tokens=24, ignore_eos=True)) for seed in range(4)]
    core = make_core(model_dir, dtype=dtype, async_scheduling=True)
    results = core.run_to_completion(requests)
    finished = [tokenizer.decode(g.token_ids) for k, g in results.items()
                if k.startswith("r") and g.finish_reason is FinishReason.STOP]
    assert len(finished) == 6 and all(re.fullmatch(REGEX, t) for t in finished), finished
    assert all(len(results[f"p{seed}"].token_ids) == 24 for seed in range(4))
