"""Prometheus metrics of the router (every name starts with `llmserve_router_`)."""

from prometheus_client import Counter, Gauge, Histogram

# Every Generate call once, refused ones included; outcomes as in common/call_outcome.py.
REQUESTS = Counter("llmserve_router_requests", "Generate calls by outcome", ["outcome"])
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
PREFIX_HASH_MISMATCH = Counter(
    "llmserve_router_prefix_hash_mismatch",
    "Times an engine was found storing blocks under other hashes than the router computes "
    "(its prefix routing is degraded)",
    ["engine"],
)
PREFIX_INDEX_BLOCKS = Gauge(
    "llmserve_router_prefix_index_blocks",
    "Distinct KV block hashes the prefix index knows engines to hold (predictions excluded)",
)
PREFIX_INDEX_ENGINE_BLOCKS = Gauge(
    "llmserve_router_prefix_index_engine_blocks",
    "KV blocks the prefix index knows each engine to hold, from its KV events",
    ["engine"],
)
