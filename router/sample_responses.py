"""A Generate call's public responses, built from the engine's chunks sample by sample.

Each sample has its own detokenizer, so a stop string ends only its sample (and, with n > 1,
asks its engine to stop generating it); the stream's last response carries the usage of every
sample, the prompt counted once, the speculative decoding counts summed over the samples.
"""

from llmserve.router import metrics
from llmserve.router.detokenizer import IncrementalDetokenizer
from llmserve.router.engine_link import SampleStops
from llmserve.router.tokenizer import TextTokenizer
from llmserve.v1 import common_pb2, engine_service_pb2, generate_service_pb2


class SampleResponses:
    """Turns engine chunks into GenerateResponses; `done` once every sample has ended."""

    def __init__(self, request: generate_service_pb2.GenerateRequest, request_id: str,
                 prompt_tokens: int, tokenizer: TextTokenizer) -> None:
        self.request_id = request_id
        self.tokenizer = tokenizer
        num_samples = max(request.sampling.n, 1)
        skip_special = (request.skip_special_tokens if request.HasField("skip_special_tokens")
                        else True)
        self.detokenizers = [
            IncrementalDetokenizer(tokenizer, request.stop, request.stopping.min_tokens,
                                   include_stop_str=request.include_stop_str_in_output,
                                   skip_special_tokens=skip_special)
            for _ in range(num_samples)
        ]
        self.usage = common_pb2.Usage(prompt_tokens=prompt_tokens)
        self._cached: int | None = None
        # Each sample's speculative decoding counts so far (proposed, accepted): cumulative in
        # every engine response, so the newest relayed one holds the sample's.
        self._speculative = [(0, 0)] * num_samples
        self.unfinished = num_samples
        # Samples a stop string ended while others go on: their engine stops them.
        self.stops = SampleStops() if num_samples > 1 else None

    @property
    def done(self) -> bool:
        return self.unfinished == 0

    async def respond(self, chunk: engine_service_pb2.EngineServiceGenerateResponse
                      ) -> generate_service_pb2.GenerateResponse | None:
        """The public response for one engine chunk; None for a chunk of a sample a stop string
        has already ended (a response that was in flight). The last one carries the usage."""
        index = chunk.index
        detokenizer = self.detokenizers[index]
        if detokenizer.stopped:
            return None
        usage = chunk.usage
        if self._cached is None and index == 0:
            self._cached = min(usage.cached_prompt_tokens, self.usage.prompt_tokens)
        if usage.speculative_proposed_tokens:
            self._speculative[index] = (usage.speculative_proposed_tokens,
                                        usage.speculative_accepted_tokens)
        token_ids = chunk.token_ids
        metrics.GENERATED_TOKENS.inc(len(token_ids))
        self.usage.completion_tokens += len(token_ids)
        final = chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
        response = generate_service_pb2.GenerateResponse(
            request_id=self.request_id,
            text=await detokenizer.push_last(token_ids) if final else detokenizer.push(token_ids),
            token_ids=token_ids,
            index=index,
        )
        if chunk.logprobs:
            response.logprobs.extend(self._with_text(chunk.logprobs))
        if chunk.prompt_logprobs:
            response.prompt_logprobs.extend(self._with_text(chunk.prompt_logprobs))
        if detokenizer.stopped or final:
            response.finish_reason = (
                common_pb2.FINISH_REASON_STOP if detokenizer.stopped else chunk.finish_reason
            )
            self.unfinished -= 1
            if self.stops is not None and not final and self.unfinished:
                self.stops.stop(index)
        if self.done:
            self.usage.cached_prompt_tokens = self._cached or 0
            self.usage.speculative_proposed_tokens = sum(p for p, _ in self._speculative)
            self.usage.speculative_accepted_tokens = sum(a for _, a in self._speculative)
            response.usage.CopyFrom(self.usage)
        return response

    def _with_text(self, logprobs: list[common_pb2.TokenLogprob]) -> list[common_pb2.TokenLogprob]:
        for entry in logprobs:
            for alternative in entry.top_logprobs:
                alternative.text = self.tokenizer.token_text(alternative.token_id)
        return logprobs
