"""Prometheus metrics of the router (every name starts with `llmserve_router_`)."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("llmserve_router_requests", "Generate requests by outcome", ["outcome"])
ROUTED = Counter("llmserve_router_routed_requests", "Requests sent to each engine", ["engine"])
PROMPT_TOKENS = Counter("llmserve_router_prompt_tokens", "Prompt tokens routed")
MATCHED_TOKENS = Counter(
    "llmserve_router_prefix_matched_tokens",
    "Prompt tokens the chosen engine was expected to hold in its prefix cache",
)
FAILOVERS = Counter("llmserve_router_failovers", "Streams moved to another engine", ["stage"])
SHED = Counter("llmserve_router_shed_requests", "Requests refused for load", ["priority"])
QUEUED = Gauge("llmserve_router_queued_requests", "Requests waiting for admission")
QUEUE_WAIT = Histogram(
    "llmserve_router_queue_wait_seconds", "Time spent waiting for admission", ["priority"]
)
GENERATED_TOKENS = Counter("llmserve_router_generated_tokens", "Tokens streamed to clients")
