"""A launched step: what it computed and drew, its tokens still on the device until read."""

from dataclasses import dataclass

import torch

from llmserve.engine_service.core.scheduler import ScheduledChunk
from llmserve.engine_service.runner.model_runner import DeviceDrafts
from llmserve.engine_service.runner.prompt_logprobs import PromptScores
from llmserve.engine_service.runner.sampler import SamplingBatch
from llmserve.engine_service.seam import RequestOutput


@dataclass
class StepInFlight:
    """A launched step: its chunks and its drawn tokens, still on the device."""

    chunks: list[ScheduledChunk]
    sampling: list[ScheduledChunk]
    tokens: torch.Tensor
    logits: torch.Tensor | None  # kept only when logprobs are wanted
    batch: SamplingBatch
    deferrable: bool
    prompt: PromptScores | None = None  # the prompt logprobs it scored
    drafts: DeviceDrafts | None = None  # guesses it verified that the host has not read
    host: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None
    outputs: "list[RequestOutput] | None" = None  # once read (`EngineCore._complete`)

    def copy_to_host(self) -> None:
        """Starts the tokens' copy to pinned host memory (on CUDA) without waiting for it."""
        if not self.tokens.is_cuda:
            return
        self.host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
        self.host.copy_(self.tokens, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def read_tokens(self) -> list[int]:
        if self.copied is not None and self.host is not None:
            self.copied.synchronize()
            return self.host.tolist()
        return self.tokens.tolist()
