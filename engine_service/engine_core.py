"""The engine's step loop: schedule, run the model, sample, stream what each request gained."""

import itertools
import random
from dataclasses import dataclass

import structlog
import torch

from llmserve.engine_service.block_pool import BlockPool
from llmserve.engine_service.model_runner import ModelRunner
from llmserve.engine_service.request import EngineRequest, FinishReason, RequestOutput
from llmserve.engine_service.sampler import Sampler, SamplingBatch
from llmserve.engine_service.scheduler import ScheduledChunk, Scheduler
from llmserve.engine_service.sequence import Sequence

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LoadSnapshot:
    """The engine's load at one moment (what `WatchLoad` streams)."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    queued_prefill_tokens: int
    requests_per_priority: tuple[int, ...]


class EngineCore:
    """Scheduler, model runner and sampler, driven one step at a time by its owner."""

    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        pool: BlockPool,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
    ) -> None:
        self.runner, self.scheduler, self.pool = runner, scheduler, pool
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.sampler = Sampler()
        self.sequences: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.num_computed_tokens_total = 0

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add_request(self, request: EngineRequest) -> None:
        if request.request_id in self.sequences:
            raise ValueError(f"request_id {request.request_id!r} is already running")
        seed = request.sampling.seed
        seq = Sequence(
            request, next(self._arrivals), seed if seed is not None else random.getrandbits(64)
        )
        self.sequences[request.request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Frees the request's sequence and KV blocks; unknown or finished ids are ignored."""
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self.scheduler.abort(seq)

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step and returns one output per request that produced a token."""
        plan = self.scheduler.schedule()
        for seq in plan.preempted:
            log.info("preempted", request_id=seq.request_id, priority=seq.priority)
        if not plan.chunks:
            return []
        logits = self.runner.execute(plan.chunks)
        self.num_computed_tokens_total += plan.num_tokens
        for chunk in plan.chunks:
            self.scheduler.commit(chunk)
        sampling = [c for c in plan.chunks if c.samples]
        tokens, logprobs = self.sampler(logits, self._sampling_batch(sampling, logits.device))
        outputs = []
        for chunk, token, token_logprobs in zip(sampling, tokens, logprobs, strict=True):
            seq = chunk.seq
            seq.token_ids.append(token)
            seq.finish_reason = self._finish_reason(seq, token)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                del self.sequences[seq.request_id]
            outputs.append(
                RequestOutput(
                    request_id=seq.request_id,
                    new_token_ids=[token],
                    new_logprobs=None if token_logprobs is None else [token_logprobs],
                    finish_reason=seq.finish_reason,
                    prompt_tokens=seq.num_prompt_tokens,
                    completion_tokens=seq.num_output_tokens,
                    cached_prompt_tokens=seq.num_cached_prompt_tokens,
                )
            )
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        options = seq.sampling
        if token in options.stop_token_ids or (
            not options.ignore_eos and token in self.eos_token_ids
        ):
            return FinishReason.STOP
        if seq.num_output_tokens >= options.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    @staticmethod
    def _sampling_batch(chunks: list[ScheduledChunk], device: torch.device) -> SamplingBatch:
        opts = [c.seq.sampling for c in chunks]

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return SamplingBatch(
            temperature=column([o.temperature for o in opts], torch.float32),
            top_p=column([o.top_p for o in opts], torch.float32),
            top_k=column([o.top_k for o in opts], torch.int64),
            min_p=column([o.min_p for o in opts], torch.float32),
            # Seeds are 64-bit unsigned; reinterpret as signed to fit int64.
            seeds=column(
                [c.seq.seed - (1 << 64) if c.seq.seed >= 1 << 63 else c.seq.seed for c in chunks],
                torch.int64,
            ),
            positions=column([c.seq.num_tokens for c in chunks], torch.int64),
            num_logprobs=[o.logprobs for o in opts],
            all_greedy=all(o.temperature == 0 for o in opts),
            filtered=any(o.top_k > 0 or o.top_p < 1 or o.min_p > 0 for o in opts),
        )

    def load(self) -> LoadSnapshot:
        running, waiting = self.scheduler.running, self.scheduler.waiting
        per_priority = [0, 0, 0]
        for seq in itertools.chain(running, waiting):
            per_priority[min(seq.priority, 2)] += 1
        queued = sum(
            max(0, s.num_prompt_tokens - s.num_computed_tokens)
            for s in itertools.chain(running, waiting)
        )
        return LoadSnapshot(
            num_running=len(running),
            num_waiting=len(waiting),
            num_free_blocks=self.pool.num_free,
            num_total_blocks=self.pool.num_blocks,
            queued_prefill_tokens=queued,
            requests_per_priority=tuple(per_priority),
        )
