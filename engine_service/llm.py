"""The offline API for batch jobs: `LLM(model_dir).generate(prompts, sampling)`.

It drives the same engine core as the server, in this process, with a progress bar that shows
prefill and decode throughput.
"""

import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.engine_builder import build_engine
from llmserve.engine_service.core.generation import Generation
from llmserve.engine_service.frontend.validation import check_prompt
from llmserve.engine_service.seam import EngineInfo, EngineRequest, RequestOutput, SamplingOptions


class LLM:
    """A model loaded for offline generation (same scheduler, runner and sampler as serving)."""

    def __init__(self, model: str | Path, **settings: object) -> None:
        self.core, self.info = build_engine(EngineConfig(model=Path(model), **settings))

    def generate(self, prompts: list[list[int]],
                 sampling: SamplingOptions | list[SamplingOptions] | None = None,
                 use_tqdm: bool = True) -> list[Generation]:
        """Generates for every prompt (token ids) and returns the results in prompt order;
        with `n > 1`, a result's `samples` holds every sample's."""
        sampling = SamplingOptions() if sampling is None else sampling
        options = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(options) != len(prompts):
            raise ValueError(f"sampling: {len(options)} entries for {len(prompts)} prompts")
        requests = []
        for i, (prompt, opts) in enumerate(zip(prompts, options, strict=True)):
            check_prompt(prompt, self.info, field=f"prompts[{i}]")
            opts = _capped(opts, self.info, len(prompt))
            requests.append(EngineRequest(f"offline-{i}", prompt, opts))
        bar = tqdm(total=len(prompts), desc="Generating", disable=not use_tqdm, dynamic_ncols=True)
        last_time, last_computed = time.perf_counter(), self.core.num_computed_tokens_total

        def progress(outputs: list[RequestOutput]) -> None:
            nonlocal last_time, last_computed
            now, computed = time.perf_counter(), self.core.num_computed_tokens_total
            num_tokens = computed - last_computed
            phase = "decode" if num_tokens == len(outputs) else "prefill"
            rate = num_tokens / max(now - last_time, 1e-9)
            bar.set_postfix_str(f"{phase} {rate:,.0f} tok/s", refresh=False)
            bar.update(sum(out.request_finished for out in outputs))
            last_time, last_computed = now, computed

        results = self.core.run_to_completion(requests, progress if use_tqdm else None)
        bar.close()
        return [results[request.request_id] for request in requests]

    def close(self) -> None:
        """Stops the other tensor-parallel ranks, if any (their processes end with this one
        anyway)."""
        self.core.runner.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _capped(options: SamplingOptions, info: EngineInfo, prompt_len: int) -> SamplingOptions:
    """Offline jobs stop at the model's length instead of failing a whole batch."""
    return replace(options, max_tokens=min(options.max_tokens, info.max_model_len - prompt_len))
