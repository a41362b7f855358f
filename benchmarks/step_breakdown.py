"""Where a decode step's time goes: the model runner, the sampler, and the rest of the host loop.

Run after the timed measurement (its syncs perturb the pipeline slightly): a short generation
with the engine core's step, runner and sampler wrapped in device-synchronized timers; then the
sampler against the one-pass kernel `kernels/sampling.py` on a batch of W1-shaped logits.
"""

import time
from collections.abc import Callable

import torch

from llmserve.engine_service.llm import LLM
from llmserve.engine_service.runner.sampler import Sampler, SamplingBatch
from llmserve.engine_service.seam import SamplingOptions
from llmserve.kernels.sampling import gumbel_sample


def step_breakdown(
    llm: LLM, prompts: list[list[int]], max_tokens: int = 64, temperature: float = 0.6
) -> dict:
    """Mean milliseconds per pure-decode step: whole step, runner.execute, sampler, the rest."""
    core = llm.core
    cuda = core.runner.device.type == "cuda"
    totals = {"step": 0.0, "execute": 0.0, "sample": 0.0}
    decode_steps = 0
    in_decode = False

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn: Callable, key: str) -> Callable:
        def wrapper(*args, **kwargs):
            sync()
            began = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            if in_decode:
                totals[key] += time.perf_counter() - began
            return out

        return wrapper

    def execute(chunks, *rest):
        nonlocal in_decode, decode_steps
        in_decode = all(c.num_tokens == 1 for c in chunks)
        decode_steps += in_decode
        return runner_execute(chunks, *rest)

    def step():
        nonlocal in_decode
        in_decode = False
        sync()
        began = time.perf_counter()
        out = core_step()
        if in_decode:
            totals["step"] += time.perf_counter() - began
        return out

    core_step, runner_execute, sample = core.step, core.runner.execute, core.sampler.sample
    core.runner.execute = timed(execute, "execute")
    core.sampler.sample = timed(sample, "sample")
    core.step = step
    try:
        llm.generate(
            prompts,
            SamplingOptions(temperature=temperature, ignore_eos=True, max_tokens=max_tokens),
            use_tqdm=False,
        )
    finally:
        del core.step, core.runner.execute, core.sampler.sample
    per_step = {k: round(v / max(decode_steps, 1) * 1e3, 3) for k, v in totals.items()}
    return {
        "decode_steps": decode_steps,
        "batch": len(prompts),
        "ms_per_step": per_step,
        "other_ms_per_step": round(per_step["step"] - per_step["execute"] - per_step["sample"], 3),
    }


def sampler_versus_kernel(rows: int, vocab: int, device: str, runs: int = 10) -> dict:
    """Median ms of the sampler (temperature 0.6, no filters) and of gumbel_sample, same rows."""
    logits = torch.randn(rows, vocab, device=device)
    temperature = torch.full((rows,), 0.6, device=device)
    seeds = torch.arange(rows, device=device)
    batch = SamplingBatch(
        temperature=temperature,
        top_p=torch.ones_like(temperature),
        top_k=torch.zeros_like(seeds),
        min_p=torch.zeros_like(temperature),
        seeds=seeds,
        positions=seeds,
        num_logprobs=[None] * rows,
    )
    sampler = Sampler()

    def median_ms(fn: Callable) -> float:
        times = []
        for _ in range(runs + 2):
            if device == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
        return round(sorted(times[2:])[runs // 2] * 1e3, 3)

    return {
        "rows": rows,
        "vocab": vocab,
        "sampler_ms": median_ms(lambda: sampler(logits, batch)),
        "gumbel_kernel_ms": median_ms(
            lambda: gumbel_sample(logits, temperature, seeds, seeds).tolist()
        ),
    }
