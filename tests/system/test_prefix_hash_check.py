"""The router notices an engine whose KV events do not carry the hashes its GetInfo implies."""

import json
import random
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from llmserve.clients import LLMClient
from llmserve.router.hash_check import MISSES_TO_FLAG, SETTLE_S

ROUTED_REQUESTS = 20


def mismatches(metrics_port: int) -> dict[str, float]:
    """llmserve_router_prefix_hash_mismatch_total by engine."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        sample.labels["engine"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llmserve_router_prefix_hash_mismatch_total"
    }


def health_details(metrics_port: int) -> dict:
    url = f"http://127.0.0.1:{metrics_port}/healthz"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_engine_misreporting_its_hash_seed_is_flagged_within_20_requests(
    tiny_checkpoint, start_engine, start_router, unused_port
) -> None:
    model = tiny_checkpoint("qwen3")
    good = start_engine(model)
    # Hashes its blocks with seed 0 but tells routers 12345.
    liar = start_engine(model, "--test-reported-hash-seed", "12345")
    metrics_port = unused_port()
    router = start_router(model, [good, liar], "--metrics-port", str(metrics_port))
    rng = random.Random(12)
    with LLMClient(router.address) as client:
        for i in range(ROUTED_REQUESTS):
            # Three full blocks (block size 16) no earlier prompt shares.
            prompt = [rng.randrange(10, 600) for _ in range(50)]
            client.generate_text(prompt_token_ids=prompt, max_tokens=1, request_id=f"h{i}")

    deadline = time.monotonic() + SETTLE_S + 10
    while not mismatches(metrics_port).get(liar.address):
        assert time.monotonic() < deadline, f"{liar.address} was not flagged"
        time.sleep(0.2)
    assert mismatches(metrics_port) == {liar.address: 1}

    flagged = [e for e in router.log_events() if e.get("event") == "prefix_hash_mismatch"]
    assert len(flagged) == 1, flagged
    assert flagged[0]["level"] == "error" and flagged[0]["engine"] == liar.address
    # Flagged on the evidence of its first requests, not after everything was sent.
    assert MISSES_TO_FLAG <= flagged[0]["routed_requests"] <= ROUTED_REQUESTS

    details = health_details(metrics_port)
    assert details["status"] == "SERVING"
    assert {e["address"]: e["prefix_routing"] for e in details["engines"]} == {
        good.address: "ok",
        liar.address: "degraded",
    }
