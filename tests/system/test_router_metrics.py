"""Router /metrics after traffic: documented names, all prefixed `llmserve_`, counters moved."""

import urllib.request

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from llmserve.clients import LLMClient
from llmserve.router import metrics

PROMPTS = ["Hello", "The quick brown fox", "Metrics should move"]
MAX_TOKENS = 4

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[set[str], Samples]:
    """The metric family names and every sample, keyed by sample name and labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families, samples = set(), {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return families, samples


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_router_metrics_move_after_traffic(qwen3_system, start_router, unused_port) -> None:
    model_dir, engine, _ = qwen3_system
    metrics_port = unused_port()
    # argparse keeps the last --metrics-port: this one turns the endpoint on.
    router = start_router(model_dir, [engine], "--metrics-port", str(metrics_port))
    _, before = scrape(metrics_port)
    with LLMClient(router.address) as client:
        prompt_tokens = sum(len(client.tokenize(p, timeout=10)) for p in PROMPTS)
        for prompt in PROMPTS:
            completion = client.generate_text(
                prompt, max_tokens=MAX_TOKENS, ignore_eos=True, timeout=30
            )
            assert len(completion.token_ids) == MAX_TOKENS
    families, after = scrape(metrics_port)

    n = len(PROMPTS)
    assert moved(before, after, "llmserve_router_requests_total", outcome="finished") == n
    assert moved(before, after, "llmserve_router_generated_tokens_total") == n * MAX_TOKENS
    assert moved(before, after, "llmserve_router_routed_requests_total", engine=engine.address) == n
    assert moved(before, after, "llmserve_router_prompt_tokens_total") == prompt_tokens
    assert moved(before, after, "llmserve_router_queue_wait_seconds_count", priority="1") == n
    assert after[("llmserve_router_queued_requests", frozenset())] == 0

    documented = {
        family.name
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
        for family in metric.describe()
    }
    assert documented, "router/metrics.py defines no metrics?"
    assert documented <= families
    assert all(name.startswith("llmserve_") for name in documented)
