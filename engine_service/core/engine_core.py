"""The engine's step loop: schedule, run the model, sample, stream what each request gained."""

import itertools
import random
from collections.abc import Callable, Iterable

import structlog

from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.block_pool import BlockPool
from llmserve.engine_service.core.generation import Generation
from llmserve.engine_service.core.sampling_rows import sampling_batch
from llmserve.engine_service.core.scheduler import ScheduledChunk, Scheduler
from llmserve.engine_service.core.sequence import Sequence
from llmserve.engine_service.core.speculator import Proposer, Speculator, num_accepted
from llmserve.engine_service.core.step_in_flight import StepInFlight
from llmserve.engine_service.core.structured_output import (
    Matcher,
    StructuredOutputs,
    accept,
    terminated,
)
from llmserve.engine_service.runner.logits_processors import LogitsProcessors
from llmserve.engine_service.runner.model_runner import (
    DeviceDrafts,
    ModelRunner,
    PendingTokens,
)
from llmserve.engine_service.runner.prompt_logprobs import PromptScores, prompt_scoring
from llmserve.engine_service.runner.sampler import Sampler
from llmserve.engine_service.seam import (
    EngineRequest,
    FinishReason,
    LoadSnapshot,
    RejectedRequest,
    RequestOutput,
    TokenLogprobs,
)

log = structlog.get_logger(__name__)


class EngineCore:
    """Scheduler, model runner and sampler, driven one step at a time by its owner."""

    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        scheduler: Scheduler,
        pool: BlockPool,
        eos_token_ids: tuple[int, ...],
        proposer: Proposer | None = None,
    ) -> None:
        """`config` is resolved: max_model_len and async_scheduling are set. `proposer` drafts
        tokens for speculative decoding (None: no speculation)."""
        assert config.max_model_len is not None and config.async_scheduling is not None
        self.config, self.runner, self.scheduler, self.pool = config, runner, scheduler, pool
        self._in_flight: StepInFlight | None = None
        # The last step planned beside one in flight stopped where it would have preempted.
        self._stalled = False
        self.eos_token_ids = frozenset(eos_token_ids)
        self.sampler = Sampler()
        self.logits_processors = LogitsProcessors(runner.spec.vocab_size, eos_token_ids,
                                                  runner.device, config.max_num_seqs)
        # Each running request's unfinished samples (one sequence each).
        self.sequences: dict[str, list[Sequence]] = {}
        self._arrivals = itertools.count()
        self.num_computed_tokens_total = 0
        self.speculator = None if proposer is None else Speculator(config, proposer)
        # Speculative decoding, all sequences so far: draft tokens proposed and accepted.
        self.num_spec_proposed_total = self.num_spec_accepted_total = 0
        self.num_spec_drafts_total = 0  # sequence-steps that verified a draft
        self.structured = StructuredOutputs(
            config.model / "tokenizer.json", runner.spec.vocab_size, tuple(eos_token_ids),
            config.structured_output_compile_timeout_s, pin_memory=runner.device.type == "cuda",
            backend=config.structured_output_backend)
        # Requests refused or failed since the owner last took them (`take_rejected`).
        self.rejected: list[RejectedRequest] = []
        # Requests whose last running sample was aborted, each ended by an output of no tokens
        # with request_finished set, since the owner last took them (`take_ended`).
        self.ended: list[RequestOutput] = []
        # Samples aborted while their request's constraint compiles: never admitted.
        self._cancelled_samples: dict[str, set[int]] = {}

    @property
    def has_work(self) -> bool:
        """A step would compute something (constraints still compiling do not count)."""
        return self.scheduler.has_work or self._in_flight is not None

    @property
    def compiling(self) -> bool:
        """Some request waits for its structured output constraint to compile."""
        return self.structured.num_compiling > 0

    def add_request(self, request: EngineRequest) -> None:
        """Queues the request; one with a structured output constraint first compiles it (off
        this thread), and is scheduled by the first step after that, or refused (`rejected`)."""
        if request.request_id in self.sequences or self.structured.has(request.request_id):
            raise ValueError(f"request_id {request.request_id!r} is already running")
        if request.sampling.structured_output is not None:
            self.structured.submit(request)
        else:
            self._add_sequence(request)

    def _add_sequence(self, request: EngineRequest, grammar: Matcher | None = None) -> None:
        """Queues a sequence per sample (but those aborted while it compiled); the scheduler
        admits the later ones once the first has computed the prompt, whose blocks they
        share."""
        seed = request.sampling.seed
        samples = []
        cancelled = self._cancelled_samples.pop(request.request_id, set())
        for index in range(request.sampling.n):
            if index in cancelled:
                continue
            seq = Sequence(
                request, next(self._arrivals),
                (seed + index) % (1 << 64) if seed is not None else random.getrandbits(64),
                grammar if not samples or grammar is None else grammar.deep_copy(), index,
            )
            if samples:
                seq.prompt_logprobs = None  # the first sample scores the prompt, once
            seq.samples = samples
            samples.append(seq)
        if not samples:  # every sample was aborted while it compiled
            self.ended.append(RequestOutput(request.request_id, [], index=max(cancelled),
                                            request_finished=True))
            return
        self.sequences[request.request_id] = list(samples)
        for seq in samples:
            self.scheduler.add(seq)

    def _admit_compiled(self) -> None:
        """Schedules the requests whose constraint compiled; refuses the others."""
        ready, refused = self.structured.poll()
        for request, matcher in ready:
            self._add_sequence(request, matcher)
        for request_id, error in refused:
            self._cancelled_samples.pop(request_id, None)
            log.info("structured_output_refused", request_id=request_id, status=error.status,
                     reason=str(error)[:200])
            self.rejected.append(RejectedRequest(request_id, str(error), error.status))

    def take_rejected(self) -> list[RejectedRequest]:
        rejected, self.rejected = self.rejected, []
        return rejected

    def abort_request(self, request_id: str, sample: int | None = None) -> None:
        """Frees the sequences of every sample of the request (or of the one `sample` names)
        and their KV blocks; unknown or finished ids and samples are ignored.

        A sample aborted while its request's other samples run just stops: the last of them to
        finish ends the request. One that was the last running ends the request with an output
        of its own, no tokens and request_finished set (`take_ended`).
        """
        if sample is not None:
            if self.structured.has(request_id):
                self._cancelled_samples.setdefault(request_id, set()).add(sample)
            else:
                self._abort_sample(request_id, sample)
            return
        self.structured.cancel(request_id)
        self._cancelled_samples.pop(request_id, None)
        for seq in self.sequences.pop(request_id, ()):
            self.scheduler.abort(seq)
            self._release(seq)

    def _abort_sample(self, request_id: str, index: int) -> None:
        samples = self.sequences.get(request_id, [])
        seq = next((s for s in samples if s.index == index), None)
        if seq is None:
            return  # finished already, out of range, or its request is unknown (or compiling)
        self.scheduler.abort(seq)
        self._release(seq)
        if self._remove_sample(seq):
            self.ended.append(RequestOutput(request_id, [], index=index, request_finished=True))

    def take_ended(self) -> list[RequestOutput]:
        ended, self.ended = self.ended, []
        return ended

    def run_to_completion(
        self,
        requests: Iterable[EngineRequest],
        on_step: Callable[[list[RequestOutput]], None] | None = None,
    ) -> dict[str, Generation]:
        """Adds the requests and steps until every one has finished; their results by id
        (sample 0's, whose `samples` lists them all).

        The offline loop (`LLM.generate`, tests), for a core that holds no other request; the
        server's core process steps between the frontend's commands instead. `on_step` gets each
        step's outputs once they are counted.
        """
        results: dict[str, Generation] = {}
        for request in requests:
            self.add_request(request)
            samples = [Generation([], None, 0, 0, index=i) for i in range(request.sampling.n)]
            for sample in samples:
                sample.samples = samples
            results[request.request_id] = samples[0]
        while self.has_work or self.compiling:
            if not self.has_work:
                self.structured.wait()
            outputs = self.step()
            for rejected in self.take_rejected():
                for sample in results[rejected.request_id].samples:
                    sample.error = rejected
            for out in outputs:
                results[out.request_id].samples[out.index].add(out)
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
        if self.compiling:
            self._admit_compiled()
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
            # Its recompute refills the slot from its tokens (nothing is pending: a step beside
            # one in flight preempts nothing).
            self._release(seq)
        drafts = None
        if self.speculator is not None and plan.chunks:
            drafts = self.speculator.attach_drafts(plan.chunks, self.scheduler)
        previous, self._in_flight = self._in_flight, None
        launched = self._launch(plan.chunks, previous, drafts) if plan.chunks else None
        if previous is not None:
            outputs += self._complete(previous)
        if launched is not None:
            if self.config.async_scheduling and launched.deferrable:
                self._in_flight = launched
            else:
                outputs += self._complete(launched)
                if self.speculator is not None and not launched.deferrable:
                    self.speculator.propose_ahead(
                        [c.seq for c in launched.sampling if self._live(c.seq)], self.scheduler)
        return outputs

    def _launch(self, chunks: list[ScheduledChunk], previous: StepInFlight | None,
                drafts: DeviceDrafts | None = None) -> StepInFlight:
        """Runs the model and draws tokens on the device; reads nothing back."""
        pending = None
        if previous is not None:
            source = {id(c.seq): i for i, c in enumerate(previous.sampling)}
            # A sequence with a pending token has nothing else to compute: the chunk is that token.
            rows = [r for r, c in enumerate(chunks) if c.seq.num_pending_tokens]
            pending = PendingTokens(previous.tokens, rows,
                                    [source[id(chunks[r].seq)] for r in rows])
        # A plain attribute test per chunk: a step where nobody asks costs no more.
        scoring = (prompt_scoring(chunks)
                   if any(c.seq.prompt_logprobs is not None for c in chunks) else None)
        logits, prompt = self.runner.execute(chunks, pending, scoring, drafts)
        self.num_computed_tokens_total += sum(c.num_tokens for c in chunks)
        for chunk in chunks:
            self.scheduler.advance(chunk)
        sampling = [c for c in chunks if c.samples]
        if previous is not None and any(c.seq.grammar is not None and c.seq.num_pending_tokens
                                        for c in sampling):
            # Structured output under async scheduling: a grammar's mask for this token needs
            # the token before it, still in the step in flight. That step is read now, while
            # this step's forward pass runs on the device, so each such row still gets a token
            # every step; the masks are filled before the draw is launched.
            self._complete(previous)
            finished = [c.seq for c in sampling if not self._live(c.seq)]
        else:
            finished = []
        batch = sampling_batch(sampling, logits.device, self.logits_processors,
                               self.structured, self._live)
        for seq in finished:  # read as finished just now: their rows' draws are discarded
            self._release(seq)
        tokens = self.sampler.sample(logits, batch)
        if batch.processing is not None:
            batch.processing.record(tokens)
        # Logprobs are read with the tokens, at once (prompt logprobs too: a later read of
        # them would queue behind the next step on the device); so is a verified draft, and a
        # step whose sequences may carry a draft into the next one.
        deferrable = (prompt is None and not any(n is not None for n in batch.num_logprobs)
                      and (self.speculator is None
                           or not self.speculator.wants_sync(sampling, self.scheduler)))
        step = StepInFlight(chunks, sampling, tokens, logits if not deferrable else None, batch,
                            deferrable, prompt, drafts)
        if deferrable:
            step.copy_to_host()
            for chunk in sampling:
                seq = chunk.seq
                if not self._live(seq):
                    continue  # read as finished early (structured output, above)
                seq.num_pending_tokens += 1
                seq.final_token_pending = self._length_reached(seq, seq.num_tokens)
        return step

    def _complete(self, step: StepInFlight) -> list[RequestOutput]:
        """Reads a launched step's tokens and streams them; finishes what they end. Once: a
        step read early (see `_launch`) gives the same outputs again."""
        if step.outputs is not None:
            return step.outputs
        token_list = step.read_tokens()
        if step.drafts is not None:
            Speculator.read_drafts(step.chunks, step.drafts)
        logprobs: list[TokenLogprobs | None] = [None] * len(token_list)
        if step.logits is not None:
            logprobs = self.sampler.logprobs(step.logits, token_list, step.batch.num_logprobs)
        for chunk in step.chunks:
            if self._live(chunk.seq) and not chunk.draft:  # a draft's: once verified, below
                self.scheduler.kv_cache.publish(chunk.seq, chunk.start,
                                                chunk.start + chunk.num_tokens)
        if step.prompt is not None:
            self._add_prompt_logprobs(step.chunks, step.prompt)
        outputs = []
        row = 0
        for chunk in step.sampling:
            seq = chunk.seq
            picks = token_list[row : row + 1 + len(chunk.draft)]
            picks_logprobs = logprobs[row : row + 1 + len(chunk.draft)]
            row += len(picks)
            if not self._live(seq):
                continue  # aborted, or finished by the token before this one
            if step.deferrable:
                seq.num_pending_tokens -= 1  # steps are read in launch order: it was the first
            accepted = num_accepted(chunk.draft, picks) if chunk.draft else 0
            length = chunk.start + chunk.num_tokens - len(chunk.draft) + 1  # with the first
            new_tokens = self._append(seq, picks[: accepted + 1], length)
            if new_tokens is None:
                continue  # failed by its grammar
            if chunk.draft:
                self._verified(chunk, accepted)
                if seq.sampling.keeps_token_state:
                    self.logits_processors.record_kept(seq, new_tokens)
            request_finished = seq.finish_reason is not None and self._end(seq)
            # The first output carries the prompt's logprobs, once.
            prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
            outputs.append(
                RequestOutput(
                    request_id=seq.request_id,
                    new_token_ids=new_tokens,
                    new_logprobs=(None if picks_logprobs[0] is None
                                  else picks_logprobs[: len(new_tokens)]),  # type: ignore[misc]
                    finish_reason=seq.finish_reason,
                    prompt_tokens=seq.num_prompt_tokens,
                    completion_tokens=length + len(new_tokens) - 1 - seq.num_prompt_tokens,
                    cached_prompt_tokens=seq.num_cached_prompt_tokens,
                    index=seq.index,
                    request_finished=request_finished,
                    prompt_logprobs=prompt_logprobs,
                    spec_proposed_tokens=seq.num_spec_proposed,
                    spec_accepted_tokens=seq.num_spec_accepted,
                )
            )
        step.outputs = outputs
        return outputs

    def _append(self, seq: Sequence, tokens: list[int], length: int) -> list[int] | None:
        """Appends the step's tokens for `seq` (the first is at `length` - 1) up to the first
        that finishes it; returns those appended, or None if its grammar refused one (then the
        request has failed)."""
        for i, token in enumerate(tokens):
            seq.token_ids.append(token)
            if seq.grammar is not None and (error := accept(seq.grammar, token)) is not None:
                self._fail(seq, str(error), error.status)
                return None
            seq.finish_reason = self._finish_reason(seq, token, length + i)
            if seq.finish_reason is not None:
                return tokens[: i + 1]
        return tokens

    def _verified(self, chunk: ScheduledChunk, accepted: int) -> None:
        """After a draft's verification: the sequence's computed KV ends before its last token
        (the rejected draft tokens' slots are overwritten later), and only the blocks of kept
        tokens are published."""
        seq = chunk.seq
        seq.num_computed_tokens = len(seq.token_ids) - 1
        self.scheduler.kv_cache.publish(seq, chunk.start, seq.num_computed_tokens)
        assert self.speculator is not None
        self.speculator.proposer.verified(seq, accepted)
        seq.num_spec_proposed += len(chunk.draft)
        seq.num_spec_accepted += accepted
        seq.num_spec_missed += int(accepted < len(chunk.draft))
        self.num_spec_proposed_total += len(chunk.draft)
        self.num_spec_accepted_total += accepted
        self.num_spec_drafts_total += 1

    def _add_prompt_logprobs(self, chunks: list[ScheduledChunk], scores: PromptScores) -> None:
        """Files each chunk's scored prompt tokens by position: a sequence preempted before its
        first output computes its prompt again from the start and scores it again."""
        for index, scored in scores.read():
            chunk = chunks[index]
            held = chunk.seq.prompt_logprobs
            if self._live(chunk.seq) and held is not None:
                held[chunk.start :] = scored

    def _end(self, seq: Sequence) -> bool:
        """Finishes one sample; says whether it was its request's last."""
        # A step launched after this one may be sampling a token past the end.
        seq.num_pending_tokens = 0
        seq.final_token_pending = False
        self.scheduler.finish(seq)
        self._release(seq)
        return self._remove_sample(seq)

    def _release(self, seq: Sequence) -> None:
        """Drops what the sampler and the proposer keep for a sequence that ended or lost its
        KV blocks."""
        self.logits_processors.release(seq)
        if self.speculator is not None:
            self.speculator.forget(seq)

    def _remove_sample(self, seq: Sequence) -> bool:
        """Takes an ended sample out of its request's running ones; says whether it was the
        last."""
        samples = self.sequences[seq.request_id]
        samples.remove(seq)
        if samples:
            return False
        del self.sequences[seq.request_id]
        return True

    def _fail(self, seq: Sequence, reason: str, status: str) -> None:
        """Ends a request with an error (a gRPC status code's name) instead of a last token:
        every sample of it, as its stream ends."""
        log.warning("request_failed", request_id=seq.request_id, status=status, reason=reason)
        seq.finish_reason = FinishReason.STOP  # no more tokens; the stream ends with the error
        self._end(seq)
        self.abort_request(seq.request_id)
        self.rejected.append(RejectedRequest(seq.request_id, reason, status))

    def _live(self, seq: Sequence) -> bool:
        # `in` compares by identity: a Sequence has no __eq__.
        return seq in self.sequences.get(seq.request_id, ())

    def _finish_reason(self, seq: Sequence, token: int, length: int) -> FinishReason | None:
        options = seq.sampling
        if token in options.stop_token_ids or (
            not options.ignore_eos and token in self.eos_token_ids
        ):
            return FinishReason.STOP
        if seq.grammar is not None and terminated(seq.grammar):
            return FinishReason.STOP  # the constraint is complete: nothing more may follow
        if self._length_reached(seq, length):
            return FinishReason.LENGTH
        return None

    def _length_reached(self, seq: Sequence, length: int) -> bool:
        """Whether `length` tokens end the sequence: its max_tokens or the model's length."""
        return length - seq.num_prompt_tokens >= seq.sampling.max_tokens or (
            length >= self.config.max_model_len
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
