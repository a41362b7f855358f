"""Engine process behaviour seen from outside: KV-event and load streams, drain, core death."""

import json
import random
import signal
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.common.block_hash import hash_full_blocks
from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc


def request(prompt: list[int], max_tokens: int) -> engine_service_pb2.EngineServiceGenerateRequest:
    return engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(temperature=0.0),
        stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
    )


class KvMirror:
    """A subscriber that rebuilds the cached-hash set from WatchKvEvents, checking numbering."""

    def __init__(self, stub: engine_service_pb2_grpc.EngineServiceStub) -> None:
        self.hashes: set[int] = set()
        self.sequence = -1
        self.stream = stub.WatchKvEvents(engine_service_pb2.WatchKvEventsRequest())
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        try:
            for batch in self.stream:
                if batch.snapshot:
                    self.hashes = set(batch.block_hashes_stored)
                else:
                    assert batch.sequence_number == self.sequence + 1, "a batch was skipped"
                    self.hashes.difference_update(batch.block_hashes_removed)
                    self.hashes.update(batch.block_hashes_stored)
                self.sequence = batch.sequence_number
        except grpc.RpcError:
            pass


def test_kv_events_replay_matches_a_fresh_snapshot(tiny_checkpoint, start_engine) -> None:
    engine = start_engine(tiny_checkpoint("qwen3"), "--num-kv-blocks", "40")
    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        info = stub.GetInfo(engine_service_pb2.GetInfoRequest())
        mirror = KvMirror(stub)
        rng = random.Random(1)
        shared = [rng.randrange(3, 600) for _ in range(64)]
        prompts = [
            shared[: rng.randrange(0, 64)]
            + [rng.randrange(3, 600) for _ in range(rng.randrange(1, 80))]
            for _ in range(30)
        ]
        calls = [stub.Generate(request(p, rng.randrange(1, 24))) for p in prompts]
        for call in calls:
            list(call)
        time.sleep(0.5)
        fresh = next(iter(stub.WatchKvEvents(engine_service_pb2.WatchKvEventsRequest())))
        assert fresh.snapshot and fresh.sequence_number == mirror.sequence
        assert mirror.hashes == set(fresh.block_hashes_stored)
        assert 0 < len(mirror.hashes) <= info.num_blocks
        # The last prompt's full blocks are cached under the published hash formula.
        expected = hash_full_blocks(prompts[-1], info.block_size, info.block_hash_seed)
        assert set(expected) <= mirror.hashes
        mirror.stream.cancel()


def test_load_stream_follows_a_running_request(tiny_checkpoint, start_engine) -> None:
    engine = start_engine(tiny_checkpoint("qwen3"))
    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        loads = stub.WatchLoad(engine_service_pb2.WatchLoadRequest(), timeout=30)
        idle = next(loads)
        assert (idle.num_running, idle.num_waiting) == (0, 0)
        call = stub.Generate(request(list(range(10, 50)), 300))
        next(call)
        busy = next(load for load in loads if load.num_running == 1)
        # 40 prompt tokens + at least one generated: three 16-token blocks or more.
        assert busy.num_total_blocks - busy.num_free_blocks >= 3
        assert list(busy.requests_per_priority) == [0, 1, 0]
        call.cancel()
        after = next(load for load in loads if load.num_running == 0)
        assert after.num_free_blocks == after.num_total_blocks
        loads.cancel()


def test_sigterm_drains_in_flight_requests_and_exits_zero(tiny_checkpoint, start_engine) -> None:
    engine = start_engine(tiny_checkpoint("qwen3"))
    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        call = stub.Generate(request([7, 8, 9], 200))
        next(call)
        engine.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while (
            health.Check(health_pb2.HealthCheckRequest()).status
            == health_pb2.HealthCheckResponse.SERVING
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request([1, 2], 2), timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(call)
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert rest[-1].usage.completion_tokens == 200
    assert engine.process.wait(timeout=20) == 0
    # Its whole output, both processes' exits included, is JSON events: no plain lines such
    # as nanobind's leak report for Triton's bindings at interpreter exit.
    lines = engine.log_path.read_text().splitlines()
    assert "stopped" in [json.loads(line)["event"] for line in lines]


def test_metrics_move_after_traffic(tiny_checkpoint, start_engine, unused_port) -> None:
    metrics_port = unused_port()
    # argparse keeps the last --metrics-port: this one turns the endpoint on.
    engine = start_engine(tiny_checkpoint("qwen3"), "--metrics-port", str(metrics_port))
    url = f"http://127.0.0.1:{metrics_port}/metrics"

    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("llmserve_")
        }

    before = scrape()
    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        for _ in range(2):
            list(stub.Generate(request(list(range(20, 60)), 5)))
    after = scrape()
    assert (
        after["llmserve_engine_generated_tokens_total"]
        - before.get("llmserve_engine_generated_tokens_total", 0)
        == 10
    )
    assert after['llmserve_engine_requests_total{outcome="finished"}'] == 2
    # The second request found the first one's two full prompt blocks in the prefix cache.
    assert after["llmserve_engine_prefix_cache_hit_tokens_total"] == 32
    assert after["llmserve_engine_prompt_tokens_total"] == 80
    assert after["llmserve_engine_time_to_first_token_seconds_count"] == 2
    assert after["llmserve_engine_inter_token_latency_seconds_count"] == 8
    # Exported from the start, and still 0: this engine does not speculate (the default).
    assert after["llmserve_engine_speculative_proposed_tokens_total"] == 0
    assert after["llmserve_engine_speculative_accepted_tokens_total"] == 0
    assert all(name.startswith("llmserve_") for name in after)


def test_core_process_death_ends_the_engine(tiny_checkpoint, start_engine, engine_dies_cleanly):
    engine = start_engine(tiny_checkpoint("qwen3"))
    engine_dies_cleanly(engine, "core_process_started")
    assert any(e.get("event") == "engine_core_died" for e in engine.log_events())
