"""Attention backend selection: names per phase, and the errors that stop start-up when the one
asked for cannot run here."""

import os
import subprocess
import sys

import pytest
import torch

from llmserve.engine_service.attention.backends import phase_backends
from llmserve.engine_service.attention.layer import BackendUnavailableError
from llmserve.engine_service.runner.cuda_graphs import (
    eager_capture,
    graph_batch_sizes,
    varlen_graph_sizes,
)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="the Triton backend runs on the CPU only in Triton's interpreter")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
def test_triton_backend_in_interpreter_equals_torch(tiny_checkpoint, make_core, greedy,
                                                    prompts, monkeypatch, kv_cache_dtype) -> None:
    model_dir = tiny_checkpoint("qwen3")
    reference = greedy(make_core(model_dir, device="cpu", kv_cache_dtype=kv_cache_dtype),
                       prompts[:3], 4)
    monkeypatch.setenv("LLMSERVE_TRITON_ON_CPU", "1")
    core = make_core(model_dir, device="cpu", attention_backend="triton",
                     kv_cache_dtype=kv_cache_dtype)
    assert core.runner.attention.name == "triton" and core.runner.ops.name == "triton"
    core.runner.capture_graphs(graph_batch_sizes(4), varlen_graph_sizes(16), eager_capture,
                               progress=False)
    assert greedy(core, prompts[:3], 4) == reference


def test_backend_names() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert phase_backends("auto", None, None, cpu) == ("torch", "torch")
    assert phase_backends("auto", None, None, cuda) == ("triton", "triton")
    assert phase_backends("triton", "flash_attn", None, cuda) == ("flash_attn", "triton")
    with pytest.raises(BackendUnavailableError, match="unknown"):
        phase_backends("xformers", None, None, cuda)


def test_triton_on_cpu_without_interpreter_is_refused(tiny_checkpoint, make_core,
                                                      monkeypatch) -> None:
    monkeypatch.delenv("LLMSERVE_TRITON_ON_CPU", raising=False)
    with pytest.raises(BackendUnavailableError, match="CUDA device"):
        make_core(tiny_checkpoint("qwen3"), device="cpu", attention_backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without flash-attn 4")
def test_flash_attn_backend_missing_fails_startup(tiny_checkpoint, make_core, tmp_path) -> None:
    with pytest.raises(BackendUnavailableError, match="flash-attn"):
        make_core(tiny_checkpoint("qwen3"), attention_backend="flash_attn")
    done = subprocess.run(
        [sys.executable, "-m", "llmserve.engine_service", "--model",
         str(tiny_checkpoint("qwen3")), "--attention-backend", "flash_attn", "--port", "0",
         "--metrics-port", "-1", "--log-format", "json"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert "startup_failed" in done.stderr and "flash-attn" in done.stderr
