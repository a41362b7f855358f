"""Prometheus metrics of the engine (names start with `llmserve_engine_`)."""

from prometheus_client import Counter, Gauge

from llmserve.engine_service.engine_core import LoadSnapshot

REQUESTS = Counter("llmserve_engine_requests", "Generate requests received", ["outcome"])
GENERATED_TOKENS = Counter("llmserve_engine_generated_tokens", "Tokens generated")
RUNNING = Gauge("llmserve_engine_running_requests", "Sequences in the running batch")
WAITING = Gauge("llmserve_engine_waiting_requests", "Sequences waiting for admission")
KV_BLOCKS_USED = Gauge("llmserve_engine_kv_blocks_used", "KV blocks held by sequences")
KV_BLOCKS_TOTAL = Gauge("llmserve_engine_kv_blocks_total", "KV blocks in the pool")


def record_load(load: LoadSnapshot) -> None:
    RUNNING.set(load.num_running)
    WAITING.set(load.num_waiting)
    KV_BLOCKS_USED.set(load.num_total_blocks - load.num_free_blocks)
    KV_BLOCKS_TOTAL.set(load.num_total_blocks)
