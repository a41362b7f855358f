"""One request's engine stream, moved to another engine when its engine fails.

Before the first token a failed engine is simply retried elsewhere. After it, the prompt plus the
tokens already streamed is resubmitted with the remaining `max_tokens` (and `min_tokens`) and the
same seed, so the client's stream continues with no token duplicated or lost (greedy and seeded
sampling give the same tokens on any engine: sampling randomness is keyed on seed and position).
The engine is told how many of the prompt's tokens are that output (`resumed_output_tokens`), so a
structured output constraint carries on from where it was instead of starting over, and the
presence and frequency penalties count those tokens as output.
The samples of an n > 1 request that fails mid-stream each resume so, as a request of their own;
a sample its caller stopped (`SampleStops`) is cancelled on its engine and never resumed.
A resumed sample's speculative decoding counts go on from those of the engines it left: each
engine counts from zero, and the router adds what the earlier ones had reported.
"""

import asyncio
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import structlog

from llmserve.common.block_hash import hash_full_blocks
from llmserve.router import metrics
from llmserve.router.balancer import Balancer
from llmserve.router.engine_link import SampleStops, StreamError
from llmserve.router.engine_pool import Engine, EnginePool
from llmserve.router.hash_check import HashSelfCheck, PendingCheck
from llmserve.router.prefix_index import PrefixIndex
from llmserve.v1 import common_pb2, engine_service_pb2

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 4
_Response = engine_service_pb2.EngineServiceGenerateResponse
# Codes that describe the request, not the engine: another engine would answer the same.
FINAL_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.PERMISSION_DENIED,
}


class NoEngineError(Exception):
    """No ready engine is left to try."""


@dataclass
class ForwardedRequest:
    """What the engine is asked for, in engine terms (already tokenized and validated)."""

    request_id: str
    prompt_token_ids: Sequence[int]
    sampling: common_pb2.SamplingParams
    max_tokens: int
    stopping: common_pb2.StoppingCriteria
    priority: int
    tenant: str


class Forwarder:
    """Routes a request and streams its tokens, failing over between engines."""

    def __init__(
        self,
        pool: EnginePool,
        index: PrefixIndex,
        balancer: Balancer,
        hash_check: HashSelfCheck,
    ) -> None:
        self.pool = pool
        self.index = index
        self.balancer = balancer
        self.hash_check = hash_check

    def _candidates(self, excluded: set[str]) -> list[Engine]:
        engines = [e for e in self.pool.ready_engines() if e.address not in excluded]
        if not engines:
            raise NoEngineError("no engine is ready to serve")
        return engines

    def _route(
        self, tokens: Sequence[int], engines: list[Engine]
    ) -> tuple[Engine, list[int], int]:
        """The engine with the best score, the prompt's block hashes there, its matched tokens."""
        # Each engine is looked up under the hashes of its own GetInfo: engines of one pool
        # normally agree (one computation), and one that differs is checked against what it
        # claims, not against its neighbours' scheme.
        by_scheme: dict[tuple[int, int], list[Engine]] = {}
        for engine in engines:
            assert engine.info is not None
            scheme = (engine.info.block_size, engine.info.block_hash_seed)
            by_scheme.setdefault(scheme, []).append(engine)
        hashes_of: dict[str, list[int]] = {}
        matched: dict[str, int] = {}
        for (block_size, seed), group in by_scheme.items():
            hashes = hash_full_blocks(tokens, block_size, seed)
            hashes_of.update((e.address, hashes) for e in group)
            matched.update(self.index.match(hashes, [e.address for e in group]))
        # Scores weigh matched blocks in one block size: the engines of a pool share it.
        block_size = next(iter(by_scheme))[0]
        held = self.index.held_blocks()
        decision = self.balancer.pick(engines, matched, len(tokens), block_size, held)
        chosen = decision.engine
        assert chosen.info is not None
        matched_tokens = decision.matched_blocks * chosen.info.block_size
        return chosen, hashes_of[chosen.address], matched_tokens

    @staticmethod
    def _reserve_prefill(attempt: "_Attempt") -> None:
        """Counts the attempt's uncached prompt tokens in its engine's queued prefill."""
        attempt.uncached = max(len(attempt.tokens) - attempt.matched_tokens, 1)
        attempt.engine.inflight_prefill += attempt.uncached

    def _account(self, attempt: "_Attempt") -> None:
        """The bookkeeping that can wait until the request is sent: the hash check, and with one
        candidate engine (nothing was chosen, so nothing was hashed) the hashes, the prediction
        and the prefill reservation too. Runs while the engine works on the request."""
        if attempt.ended:
            return
        engine = attempt.engine
        assert engine.info is not None
        if attempt.hashes is None:
            attempt.hashes = hash_full_blocks(
                attempt.tokens, engine.info.block_size, engine.info.block_hash_seed
            )
            blocks = self.index.match(attempt.hashes, [engine.address])[engine.address]
            attempt.matched_tokens = blocks * engine.info.block_size
            self.index.predict(engine.address, attempt.hashes)
            self._reserve_prefill(attempt)
        attempt.check = self.hash_check.routed(engine.address, attempt.hashes)

    def _started(self, attempt: "_Attempt") -> None:
        """The engine sent the attempt's first token: its prefill is done."""
        attempt.started = True
        attempt.engine.inflight_prefill -= attempt.uncached
        self.hash_check.computed(attempt.check)

    def _ended(self, attempt: "_Attempt") -> None:
        attempt.ended = True
        engine = attempt.engine
        engine.inflight -= 1
        if not attempt.started:
            engine.inflight_prefill -= attempt.uncached
            self.hash_check.abandoned(attempt.check)

    async def stream(
        self, request: ForwardedRequest, deadline: float | None, stops: SampleStops | None = None
    ) -> AsyncIterator[_Response]:
        """Yields engine responses, each naming its sample (`index`); ends once every sample
        has sent its last one (with a finish reason) or is in `stops`: the caller stops a
        sample there (between two responses) and the engine stops generating it. Usage counts
        are the engines' own, but for the speculative decoding counts of a sample that moved:
        those add the counts of the engines it left (`_Sample.carry`).

        An n > 1 request goes to one engine as one request, so its prompt is routed once. If a
        sample has streamed tokens when that engine fails, each unfinished sample carries on as
        a request of its own (n = 1, its tokens appended to the prompt, seeded `seed + index`),
        all at once.
        """
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        if not sampling.HasField("seed"):
            # A seed chosen here keeps a sampled stream identical across a failover.
            sampling.seed = random.getrandbits(63)
        loop = asyncio.get_running_loop()
        loop_deadline = None if deadline is None else loop.time() + deadline - time.monotonic()
        samples = [_Sample(index) for index in range(max(sampling.n, 1))]
        if stops is None:
            stops = SampleStops()
        async for response in self._attempts(request, sampling, samples, stops, set(),
                                             loop_deadline, first=True):
            yield response

    async def _attempts(
        self,
        request: ForwardedRequest,
        sampling: common_pb2.SamplingParams,
        samples: "list[_Sample]",
        stops: SampleStops,
        excluded: set[str],
        loop_deadline: float | None,
        first: bool,
    ) -> AsyncIterator[_Response]:
        """Serves `samples` (all of the request's, or one) as one engine request, moving it to
        another engine when one fails; `sampling` is that request's (its n is their count)."""
        prompt_len = len(request.prompt_token_ids)
        loop = asyncio.get_running_loop()
        for attempt_number in range(MAX_ATTEMPTS):
            for sample in samples:
                if sample.index in stops.done:
                    sample.done = True  # stopped by the caller: not resumed
            if all(s.done for s in samples):
                return
            if len(samples) > 1 and any(s.generated or s.done for s in samples):
                async for response in self._each_sample(request, sampling, samples, stops,
                                                        excluded, loop_deadline):
                    yield response
                return
            generated = samples[0].generated if len(samples) == 1 else []
            tokens = request.prompt_token_ids
            if generated:
                tokens = [*tokens, *generated]
            engines = self._candidates(excluded)
            if len(engines) == 1:
                attempt = _Attempt(engines[0], tokens)
            else:
                engine, hashes, matched_tokens = self._route(tokens, engines)
                # At once, not deferred: the next request of a burst is scored knowing this one
                # (a shared new prefix follows it; its prefill counts in the engine's load).
                self.index.predict(engine.address, hashes)
                attempt = _Attempt(engine, tokens, hashes, matched_tokens)
                self._reserve_prefill(attempt)
            engine = attempt.engine
            stopping = common_pb2.StoppingCriteria()
            stopping.CopyFrom(request.stopping)
            stopping.max_tokens = request.max_tokens - len(generated)
            stopping.min_tokens = max(0, request.stopping.min_tokens - len(generated))
            engine_request = {
                "request_id": request.request_id,
                "prompt_token_ids": tokens,
                "sampling": sampling,
                "stopping": stopping,
                "priority": request.priority,
                "tenant": request.tenant,
                # The tokens already streamed: a structured output constraint resumes after them.
                "resumed_output_tokens": len(generated),
            }
            # Several samples: served under their own indices, which the caller stops by.
            solo = samples[0] if len(samples) == 1 else None
            responses = engine.link.stream(engine_request, loop_deadline, len(samples),
                                           None if solo else stops)
            engine.inflight += 1
            # The bookkeeping runs once the request is on its way (the stream's first step
            # writes it), before any response can arrive.
            loop.call_soon(self._account, attempt)
            if first and attempt_number == 0:
                loop.call_soon(_count_routed, request, attempt, prompt_len)
            try:
                async for chunk in responses:
                    if solo is not None and solo.index in stops.done:
                        break  # one sample resumed on its own, stopped by the caller
                    sample = samples[chunk.index]
                    if chunk.index != sample.index:
                        chunk.index = sample.index  # one sample served as a request of its own
                    sample.generated.extend(chunk.token_ids)
                    sample.carry(chunk.usage)
                    if chunk.prompt_logprobs:
                        # Delivered, once: an engine the request moves to must not score the
                        # prompt (then with the output appended) again.
                        sampling.ClearField("prompt_logprobs")
                    if chunk.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED:
                        yield chunk
                        if not attempt.started:
                            self._started(attempt)  # after the first token went out
                        continue
                    sample.done = True
                    if not attempt.started:
                        self._started(attempt)
                    yield chunk
                if all(s.done or s.index in stops.done for s in samples):
                    return
                failure = "stream ended before the request finished"
            except StreamError as exc:
                if exc.code in FINAL_CODES:
                    raise
                failure = str(exc)
            finally:
                await responses.aclose()
                self._ended(attempt)
            excluded.add(engine.address)
            for sample in samples:
                sample.left_engine()
            tokens_so_far = sum(len(s.generated) for s in samples)
            stage = "mid_stream" if tokens_so_far else "before_first_token"
            metrics.FAILOVERS.labels(stage).inc()
            log.warning(
                "engine_failed_over",
                request_id=request.request_id,
                engine=engine.address,
                stage=stage,
                tokens_so_far=tokens_so_far,
                error=failure[:200],
            )
        raise NoEngineError(f"gave up after {MAX_ATTEMPTS} engines failed")

    def _each_sample(
        self,
        request: ForwardedRequest,
        sampling: common_pb2.SamplingParams,
        samples: "list[_Sample]",
        stops: SampleStops,
        excluded: set[str],
        loop_deadline: float | None,
    ) -> AsyncIterator[_Response]:
        """The unfinished samples, each as a request of its own, their responses as they come."""
        streams = []
        for sample in samples:
            if sample.done:
                continue
            own = common_pb2.SamplingParams()
            own.CopyFrom(sampling)
            own.ClearField("n")
            own.seed = (sampling.seed + sample.index) % (1 << 64)
            streams.append(self._attempts(request, own, [sample], stops, excluded,
                                          loop_deadline, first=False))
        return _merged(streams)


@dataclass
class _Sample:
    """One sample of a request: the tokens it has streamed, whether it has ended, and its
    speculative decoding counts (draft tokens proposed and accepted) on the engines it left and
    on the one serving it."""

    index: int
    generated: list[int] = field(default_factory=list)
    done: bool = False
    earlier_proposed: int = 0
    earlier_accepted: int = 0
    proposed_here: int = 0
    accepted_here: int = 0

    def carry(self, usage: common_pb2.Usage) -> None:
        """Notes the serving engine's counts so far (cumulative, like completion_tokens) and
        adds those of the engines this sample left, so `usage` counts every engine's."""
        self.proposed_here = usage.speculative_proposed_tokens
        self.accepted_here = usage.speculative_accepted_tokens
        if self.earlier_proposed or self.earlier_accepted:
            usage.speculative_proposed_tokens += self.earlier_proposed
            usage.speculative_accepted_tokens += self.earlier_accepted

    def left_engine(self) -> None:
        """Its engine failed: the next one counts from zero, after what this one reported."""
        self.earlier_proposed += self.proposed_here
        self.earlier_accepted += self.accepted_here
        self.proposed_here = self.accepted_here = 0


@dataclass
class _Attempt:
    """One engine's try at a request, and the prefix bookkeeping it has caused so far."""

    engine: Engine
    tokens: Sequence[int]
    hashes: list[int] | None = None  # None: not computed yet (one candidate engine)
    matched_tokens: int = 0
    uncached: int = 0  # prompt tokens counted in the engine's queued prefill
    check: PendingCheck | None = None
    started: bool = False
    ended: bool = False


async def _merged(streams: list[AsyncIterator[_Response]]) -> AsyncIterator[_Response]:
    """The items of several streams as each comes; the first error ends them all."""
    queue: asyncio.Queue[_Response | Exception | None] = asyncio.Queue()

    async def drain(stream: AsyncIterator[_Response]) -> None:
        try:
            async for item in stream:
                queue.put_nowait(item)
        except Exception as exc:  # handed to the reader, which raises it
            queue.put_nowait(exc)
        queue.put_nowait(None)

    tasks = [asyncio.create_task(drain(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _count_routed(request: ForwardedRequest, attempt: _Attempt, prompt_len: int) -> None:
    address = attempt.engine.address
    metrics.ROUTED.labels(address).inc()
    metrics.PROMPT_TOKENS.inc(prompt_len)
    metrics.MATCHED_TOKENS.inc(min(attempt.matched_tokens, prompt_len))
    log.info(
        "request_routed",
        request_id=request.request_id,
        engine=address,
        prompt_tokens=prompt_len,
        matched_tokens=attempt.matched_tokens,
    )
