"""The offline API for batch jobs: `LLM(model_dir).generate(prompts, sampling)`.

It drives the same engine core as the server, in this process, with a progress bar that shows
prefill and decode throughput.
"""

import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.engine_builder import build_engine
from llmserve.engine_service.frontend.validation import check_prompt
from llmserve.engine_service.seam import EngineInfo, EngineRequest, FinishReason, SamplingOptions


@dataclass
class Generation:
    """One prompt's result."""

    token_ids: list[int]
    finish_reason: FinishReason | None
    cached_prompt_tokens: int


class LLM:
    """A model loaded for offline generation (same scheduler, runner and sampler as serving)."""

    def __init__(self, model: str | Path, **settings: object) -> None:
        self.core, self.info = build_engine(EngineConfig(model=Path(model), **settings))

    def generate(self, prompts: list[list[int]],
                 sampling: SamplingOptions | list[SamplingOptions] | None = None,
                 use_tqdm: bool = True) -> list[Generation]:
        """Generates for every prompt (token ids) and returns the results in prompt order."""
        sampling = SamplingOptions() if sampling is None else sampling
        options = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(options) != len(prompts):
            raise ValueError(f"sampling: {len(options)} entries for {len(prompts)} prompts")
        results: dict[str, Generation] = {}
        for i, (prompt, opts) in enumerate(zip(prompts, options, strict=True)):
            check_prompt(prompt, self.info, field=f"prompts[{i}]")
            opts = _capped(opts, self.info, len(prompt))
            self.core.add_request(EngineRequest(f"offline-{i}", prompt, opts))
            results[f"offline-{i}"] = Generation([], None, 0)
        bar = tqdm(total=len(prompts), desc="Generating", disable=not use_tqdm, dynamic_ncols=True)
        while self.core.has_work:
            started, computed = time.perf_counter(), self.core.num_computed_tokens_total
            outputs = self.core.step()
            elapsed = max(time.perf_counter() - started, 1e-9)
            num_tokens = self.core.num_computed_tokens_total - computed
            phase = "decode" if num_tokens == len(outputs) else "prefill"
            bar.set_postfix_str(f"{phase} {num_tokens / elapsed:,.0f} tok/s", refresh=False)
            for out in outputs:
                result = results[out.request_id]
                result.token_ids.extend(out.new_token_ids)
                if out.finish_reason is not None:
                    result.finish_reason = out.finish_reason
                    result.cached_prompt_tokens = out.cached_prompt_tokens
                    bar.update(1)
        bar.close()
        return [results[f"offline-{i}"] for i in range(len(prompts))]

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
