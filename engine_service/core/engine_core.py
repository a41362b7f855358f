"""The engine's step loop: schedule, run the model, sample, stream what each request gained."""

import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog
import torch

from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.block_pool import BlockPool
from llmserve.engine_service.core.scheduler import ScheduledChunk, Scheduler
from llmserve.engine_service.core.sequence import Sequence
from llmserve.engine_service.runner.model_runner import ModelRunner, PendingTokens
from llmserve.engine_service.runner.sampler import Sampler, SamplingBatch
from llmserve.engine_service.runner.step_inputs import upload
from llmserve.engine_service.seam import (
    EngineRequest,
    FinishReason,
    LoadSnapshot,
    RequestOutput,
    TokenLogprobs,
)

log = structlog.get_logger(__name__)


@dataclass
class Generation:
    """One request's result when run to its end in this process (`run_to_completion`)."""

    token_ids: list[int]
    finish_reason: FinishReason | None
    cached_prompt_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # if the request asked for them


@dataclass
class StepInFlight:
    """A launched step: its chunks and its drawn tokens, still on the device."""

    chunks: list[ScheduledChunk]
    sampling: list[ScheduledChunk]
    tokens: torch.Tensor
    logits: torch.Tensor | None  # kept only when logprobs are wanted
    batch: SamplingBatch
    deferrable: bool
    host: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None

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


class EngineCore:
    """Scheduler, model runner and sampler, driven one step at a time by its owner."""

    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        scheduler: Scheduler,
        pool: BlockPool,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        """`config` is resolved: max_model_len and async_scheduling are set."""
        assert config.max_model_len is not None and config.async_scheduling is not None
        self.config, self.runner, self.scheduler, self.pool = config, runner, scheduler, pool
        self._in_flight: StepInFlight | None = None
        # The last step planned beside one in flight stopped where it would have preempted.
        self._stalled = False
        self.eos_token_ids = frozenset(eos_token_ids)
        self.sampler = Sampler()
        self.sequences: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.num_computed_tokens_total = 0

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

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

    def run_to_completion(
        self,
        requests: Iterable[EngineRequest],
        on_step: Callable[[list[RequestOutput]], None] | None = None,
    ) -> dict[str, Generation]:
        """Adds the requests and steps until every one has finished; their results by id.

        The offline loop (`LLM.generate`, tests), for a core that holds no other request; the
        server's core process steps between the frontend's commands instead. `on_step` gets each
        step's outputs once they are counted.
        """
        results: dict[str, Generation] = {}
        for request in requests:
            self.add_request(request)
            results[request.request_id] = Generation([], None, 0)
        while self.has_work:
            outputs = self.step()
            for out in outputs:
                result = results[out.request_id]
                result.token_ids += out.new_token_ids
                if out.new_logprobs:
                    result.logprobs += out.new_logprobs
                if out.finish_reason is not None:
                    result.finish_reason = out.finish_reason
                    result.cached_prompt_tokens = out.cached_prompt_tokens
            if on_step is not None:
                on_step(outputs)
        return results

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step and returns one output per request that produced a token.

        With `async_scheduling` a step's sampled tokens are read while the next step already
        runs on the device (its outputs come back from the following call), so the host's
        scheduling and bookkeeping hide behind the GPU: decode, prefill chunks and admissions
        alike. A step planned beside the one in flight preempts nothing (the scheduler's rule);
        where it would have to, the next step first waits for the one in flight and plans again.
        """
        outputs: list[RequestOutput] = []
        plan = None
        if self._in_flight is not None:
            if not self._stalled:
                plan = self.scheduler.schedule(step_in_flight=True)
                self._stalled = plan.stalled
            if plan is None or not plan.chunks:
                outputs += self._complete(self._in_flight)
                self._in_flight = None
                plan = None
        if plan is None:
            plan = self.scheduler.schedule()
            self._stalled = False
        for seq in plan.preempted:
            log.info("preempted", request_id=seq.request_id, priority=seq.priority)
        previous, self._in_flight = self._in_flight, None
        launched = self._launch(plan.chunks, previous) if plan.chunks else None
        if previous is not None:
            outputs += self._complete(previous)
        if launched is not None:
            if self.config.async_scheduling and launched.deferrable:
                self._in_flight = launched
            else:
                outputs += self._complete(launched)
        return outputs

    def _launch(self, chunks: list[ScheduledChunk], previous: "StepInFlight | None"
                ) -> "StepInFlight":
        """Runs the model and draws tokens on the device; reads nothing back."""
        pending = None
        if previous is not None:
            source = {id(c.seq): i for i, c in enumerate(previous.sampling)}
            # A sequence with a pending token has nothing else to compute: the chunk is that token.
            rows = [r for r, c in enumerate(chunks) if c.seq.num_pending_tokens]
            pending = PendingTokens(previous.tokens, rows,
                                    [source[id(chunks[r].seq)] for r in rows])
        logits = self.runner.execute(chunks, pending)
        self.num_computed_tokens_total += sum(c.num_tokens for c in chunks)
        for chunk in chunks:
            self.scheduler.advance(chunk)
        sampling = [c for c in chunks if c.samples]
        batch = self._sampling_batch(sampling, logits.device)
        tokens = self.sampler.sample(logits, batch)
        deferrable = not any(n is not None for n in batch.num_logprobs)
        step = StepInFlight(chunks, sampling, tokens, logits if not deferrable else None, batch,
                            deferrable)
        if deferrable:
            step.copy_to_host()
            for chunk in sampling:
                seq = chunk.seq
                seq.num_pending_tokens += 1
                seq.final_token_pending = self._length_reached(seq, seq.num_tokens)
        return step

    def _complete(self, step: "StepInFlight") -> list[RequestOutput]:
        """Reads a launched step's tokens and streams them; finishes what they end."""
        token_list = step.read_tokens()
        logprobs: list[TokenLogprobs | None] = [None] * len(token_list)
        if step.logits is not None:
            logprobs = self.sampler.logprobs(step.logits, token_list, step.batch.num_logprobs)
        for chunk in step.chunks:
            if self._live(chunk.seq):
                self.scheduler.kv_cache.publish(chunk.seq, chunk.start,
                                                chunk.start + chunk.num_tokens)
        outputs = []
        for chunk, token, token_logprobs in zip(step.sampling, token_list, logprobs, strict=True):
            seq = chunk.seq
            if not self._live(seq):
                continue  # aborted, or finished by the token before this one
            length = chunk.start + chunk.num_tokens + 1
            if step.deferrable:
                seq.num_pending_tokens -= 1  # steps are read in launch order: it was the first
            seq.token_ids.append(token)
            seq.finish_reason = self._finish_reason(seq, token, length)
            if seq.finish_reason is not None:
                # A step launched after this one may be sampling a token past the end.
                seq.num_pending_tokens = 0
                seq.final_token_pending = False
                self.scheduler.finish(seq)
                del self.sequences[seq.request_id]
            outputs.append(
                RequestOutput(
                    request_id=seq.request_id,
                    new_token_ids=[token],
                    new_logprobs=None if token_logprobs is None else [token_logprobs],
                    finish_reason=seq.finish_reason,
                    prompt_tokens=seq.num_prompt_tokens,
                    completion_tokens=length - seq.num_prompt_tokens,
                    cached_prompt_tokens=seq.num_cached_prompt_tokens,
                )
            )
        return outputs

    def _live(self, seq: Sequence) -> bool:
        return self.sequences.get(seq.request_id) is seq

    def _finish_reason(self, seq: Sequence, token: int, length: int) -> FinishReason | None:
        options = seq.sampling
        if token in options.stop_token_ids or (
            not options.ignore_eos and token in self.eos_token_ids
        ):
            return FinishReason.STOP
        if self._length_reached(seq, length):
            return FinishReason.LENGTH
        return None

    def _length_reached(self, seq: Sequence, length: int) -> bool:
        """Whether `length` tokens end the sequence: its max_tokens or the model's length."""
        return length - seq.num_prompt_tokens >= seq.sampling.max_tokens or (
            length >= self.config.max_model_len
        )

    @staticmethod
    def _sampling_batch(chunks: list[ScheduledChunk], device: torch.device) -> SamplingBatch:
        opts = [c.seq.sampling for c in chunks]

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return upload(values, dtype, device)

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
            any_greedy=any(o.temperature == 0 for o in opts),
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
