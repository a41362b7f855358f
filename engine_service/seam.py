"""What crosses between the gRPC frontend process and the engine core process.

Plain dataclasses and enums, pickled over the pipe between them (vLLM's `v1/engine/__init__.py`
plays this part): the frontend imports this module and never the core, so it loads no torch.
The frontend sends `AddRequest`, `AbortRequest` (of a request, or of one sample) or None (stop);
the core answers once with `EngineInfo` (or the exception that stopped its start-up), then with
a `StepResult` per step that changed something and a `RejectedRequest` for a request it refused.
"""

from dataclasses import dataclass, field
from enum import Enum

from llmserve.common.block_hash import ALGORITHM
from llmserve.engine_service.config import EngineConfig


class FinishReason(Enum):
    LENGTH = "length"
    STOP = "stop"


# Temperatures below this are greedy (vLLM's _SAMPLING_EPS). Far smaller ones overflow logits / T
# in fp32 (1e-45 is subnormal) into NaN probabilities; at 1e-5 a logit gap of 1e-3 already
# weighs exp(-100), so a draw differs from greedy only between near-ties.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class StructuredOutputSpec:
    """What a request's output must be (already within the shared bounds): `kind` is one of
    STRUCTURED_OUTPUT_KINDS and `spec` its text (a JSON schema, a regex, a Lark grammar; "" for
    json_object) or, for "choice", the strings. The engine core compiles it."""

    kind: str
    spec: str | tuple[str, ...]


STRUCTURED_OUTPUT_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")


@dataclass(frozen=True)
class SamplingOptions:
    """How one request's tokens are drawn and when it stops (already validated)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), each id once
    min_tokens: int = 0
    # None: no constraint. Otherwise a grammar masks every drawn token (core/structured_output).
    structured_output: StructuredOutputSpec | None = None
    n: int = 1  # samples of the prompt; sample i is seeded seed + i (mod 2**64)
    prompt_logprobs: int | None = None  # alternatives per prompt token; None = none
    # Tokens proposed per step for this request when the engine speculates (capped at the
    # engine's --num-speculative-tokens); None: the engine's; 0: no speculation.
    speculative_tokens: int | None = None
    # Whether the sampler changes this request's logits before drawing (any of the five above);
    # set from them, so a batch where no row does can tell at the cost of one test per row.
    processes_logits: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        # Here, where every path builds its options, so the torch and Triton samplers both see 0.
        if self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)
        object.__setattr__(self, "processes_logits", self.keeps_token_state or self.min_tokens > 0)

    @property
    def keeps_token_state(self) -> bool:
        """A penalty or a logit bias: the engine keeps this request's token counts and bias on
        the device while it runs."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class EngineRequest:
    """A prompt as token ids, with its sampling options and priority class (0 = most important)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    priority: int = 1
    tenant: str = ""
    # The last this-many prompt ids are output another engine already streamed (a router's
    # failover): a structured output constraint resumes after them instead of starting over.
    resumed_output_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability and the top alternatives at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    """What one step produced for one request; the last one carries the finish reason."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    index: int = 0  # the sample (0 to n - 1); finish_reason ends that sample
    # Every sample of the request has finished: the request's last output (with n = 1, the one
    # with a finish reason).
    request_finished: bool = False
    # The prompt's tokens after the first, on a request's first output, if it asked for them.
    prompt_logprobs: list[TokenLogprobs] | None = None
    # When the frontend received it (its own monotonic clock), for latency metrics.
    arrival: float = 0.0
    # Speculative decoding, for this sample so far: draft tokens proposed and accepted.
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0


@dataclass(frozen=True)
class EngineInfo:
    """What `GetInfo` reports: the model and the limits it is served under."""

    model: str
    architecture: str
    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_hash_algorithm: str
    block_hash_seed: int
    eos_token_ids: tuple[int, ...]
    attention_backend: str
    dtype: str
    tensor_parallel_size: int
    device: str
    max_tokens_default: int

    @classmethod
    def describe(cls, config: EngineConfig, *, architecture: str, vocab_size: int,
                 eos_token_ids: tuple[int, ...], attention_backend: str, dtype: str,
                 device: str) -> "EngineInfo":
        """What an engine reports: its resolved config (max_model_len and num_kv_blocks set),
        with what the checkpoint and the device decided."""
        assert config.max_model_len is not None and config.num_kv_blocks is not None
        return cls(
            model=config.model.name,
            architecture=architecture,
            vocab_size=vocab_size,
            max_model_len=config.max_model_len,
            block_size=config.block_size,
            num_blocks=config.num_kv_blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            block_hash_algorithm=ALGORITHM,
            block_hash_seed=config.block_hash_seed,
            eos_token_ids=eos_token_ids,
            attention_backend=attention_backend,
            dtype=dtype,
            tensor_parallel_size=config.tensor_parallel_size,
            device=device,
            max_tokens_default=config.max_tokens_default,
        )


@dataclass(frozen=True)
class LoadSnapshot:
    """The engine's load at one moment (what `WatchLoad` streams)."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    queued_prefill_tokens: int
    requests_per_priority: tuple[int, ...]


@dataclass(frozen=True)
class AddRequest:
    request: EngineRequest


@dataclass(frozen=True)
class AbortRequest:
    request_id: str
    sample: int | None = None  # one sample (its index) of the request; None: every sample


@dataclass(frozen=True)
class RejectedRequest:
    """The core refused a request it was sent (e.g. a duplicate id, or a structured output
    constraint that does not compile), or failed one it was serving; `status` names the gRPC
    status code the stream ends with."""

    request_id: str
    reason: str
    status: str = "INVALID_ARGUMENT"


@dataclass(frozen=True)
class StepResult:
    """What one step changed: new tokens, the load, and the prefix cache's net changes."""

    outputs: list[RequestOutput]
    load: LoadSnapshot
    stored_hashes: list[int]
    removed_hashes: list[int]
    num_preemptions: int
    num_computed_tokens: int
    # Speculative decoding in this step: draft tokens proposed and accepted, all sequences.
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_drafts: int = 0  # sequences that verified a draft
