"""A router started with --busy-poll streams the same tokens and sleeps again once idle."""

import os
import time

from llmserve.clients import LLMClient


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_busy_poll_router_streams_the_same_tokens_then_idles(qwen3_system, start_router) -> None:
    model_dir, engine, router = qwen3_system
    busy = start_router(model_dir, [engine], "--busy-poll")
    request = {"prompt_token_ids": [5, 6, 7, 8], "temperature": 0.0, "max_tokens": 64,
               "ignore_eos": True}
    with LLMClient(router.address) as client:
        expected = client.generate_text(**request)
    with LLMClient(busy.address) as client:
        got = client.generate_text(**request)
    assert got.token_ids == expected.token_ids and len(got.token_ids) == 64
    assert got.text == expected.text
    time.sleep(0.2)
    idle_before = _cpu_s(busy.process.pid)
    time.sleep(1.0)
    # Polling stopped with the last request: an idle router costs next to no CPU.
    assert _cpu_s(busy.process.pid) - idle_before < 0.1
