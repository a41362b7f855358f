"""Prometheus metrics of the engine (every name starts with `llmserve_engine_`)."""

from prometheus_client import Counter, Gauge, Histogram

from llmserve.engine_service.seam import RequestOutput, StepResult

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)

# Every request (a Generate call or a GenerateStreams stream) once, refused ones included;
# outcomes as in common/call_outcome.py.
REQUESTS = Counter("llmserve_engine_requests", "Generate requests by outcome", ["outcome"])
GENERATED_TOKENS = Counter("llmserve_engine_generated_tokens", "Tokens generated")
COMPUTED_TOKENS = Counter("llmserve_engine_computed_tokens", "Tokens run through the model")
PROMPT_TOKENS = Counter("llmserve_engine_prompt_tokens", "Prompt tokens of finished requests")
CACHED_PROMPT_TOKENS = Counter("llmserve_engine_prefix_cache_hit_tokens",
                               "Prompt tokens of finished requests served from the prefix cache")
PREEMPTIONS = Counter("llmserve_engine_preemptions", "Sequences preempted for recomputation")
# Speculative decoding: accepted / proposed is the acceptance rate (both stay 0 without it).
SPECULATIVE_PROPOSED_TOKENS = Counter("llmserve_engine_speculative_proposed_tokens",
                                      "Draft tokens proposed by speculative decoding")
SPECULATIVE_ACCEPTED_TOKENS = Counter("llmserve_engine_speculative_accepted_tokens",
                                      "Draft tokens the model accepted as its own next tokens")
# One per sequence per step that verified a draft: 1 + accepted / drafts is the mean number of
# tokens such a step gave a sequence.
SPECULATIVE_DRAFTS = Counter("llmserve_engine_speculative_drafts",
                             "Drafts verified (one per sequence and step that carried one)")
RUNNING = Gauge("llmserve_engine_running_requests", "Sequences in the running batch")
WAITING = Gauge("llmserve_engine_waiting_requests", "Sequences waiting for admission")
KV_USAGE = Gauge("llmserve_engine_kv_cache_usage_ratio", "Fraction of KV blocks held by sequences")
TTFT = Histogram("llmserve_engine_time_to_first_token_seconds",
                 "Request received to first token handed to its stream", buckets=LATENCY_BUCKETS)
ITL = Histogram("llmserve_engine_inter_token_latency_seconds",
                "Gap between consecutive tokens of a stream", buckets=LATENCY_BUCKETS)


def record_step(step: StepResult) -> None:
    """Updates the per-step counters and gauges (called for every step result)."""
    load = step.load
    RUNNING.set(load.num_running)
    WAITING.set(load.num_waiting)
    KV_USAGE.set(1 - load.num_free_blocks / max(load.num_total_blocks, 1))
    PREEMPTIONS.inc(step.num_preemptions)
    COMPUTED_TOKENS.inc(step.num_computed_tokens)
    SPECULATIVE_PROPOSED_TOKENS.inc(step.spec_proposed_tokens)
    SPECULATIVE_ACCEPTED_TOKENS.inc(step.spec_accepted_tokens)
    SPECULATIVE_DRAFTS.inc(step.spec_drafts)
    for output in step.outputs:
        GENERATED_TOKENS.inc(len(output.new_token_ids))
        if output.finish_reason is not None and output.index == 0:  # a prompt counts once
            PROMPT_TOKENS.inc(output.prompt_tokens)
            CACHED_PROMPT_TOKENS.inc(output.cached_prompt_tokens)


class StreamLatency:
    """Records one stream's time to first token and its inter-token gaps."""

    def __init__(self, started: float) -> None:
        self.last = started
        self.first = True

    def record(self, output: RequestOutput) -> None:
        gap = max(0.0, output.arrival - self.last)
        (TTFT if self.first else ITL).observe(gap)
        self.first = False
        self.last = output.arrival
