"""What of the CUDA path can be checked without a GPU: the graph ladder and padding, the
fixed-address step inputs, the graph path end to end with the CPU stand-in for capture, the
block-table mirror, KV sizing arithmetic, and backend selection errors."""

import os
import subprocess
import sys

import pytest
import torch

from llmserve.engine_service.attention import BackendUnavailableError
from llmserve.engine_service.attention_backends import phase_backends
from llmserve.engine_service.block_table import BlockTableMirror
from llmserve.engine_service.cuda_graphs import (
    eager_capture,
    graph_batch_sizes,
    padded_batch_size,
    varlen_graph_sizes,
)
from llmserve.engine_service.kv_sizing import MemorySnapshot, dummy_chunks, num_kv_blocks
from llmserve.engine_service.request import EngineRequest
from llmserve.engine_service.scheduler import ScheduledChunk
from llmserve.engine_service.sequence import Sequence
from llmserve.engine_service.step_inputs import StepInputs

GIB = 1 << 30


def chunk(tokens: list[int], blocks: list[int], start: int, count: int) -> ScheduledChunk:
    seq = Sequence(EngineRequest(f"s{id(tokens)}", tokens), 0, 0)
    seq.block_ids = blocks
    return ScheduledChunk(seq, start, count)


def test_graph_ladder_and_padding() -> None:
    sizes = graph_batch_sizes(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 256 and len(sizes) == 35
    assert graph_batch_sizes(100)[-2:] == [96, 100]
    assert graph_batch_sizes(3) == [1, 2, 3] and graph_batch_sizes(1) == [1]
    assert [padded_batch_size(n, sizes) for n in (1, 3, 5, 9, 250, 256)] == [
        1, 4, 8, 16, 256, 256]
    assert padded_batch_size(257, sizes) is None
    varlen = varlen_graph_sizes(2048)
    assert varlen[:6] == [16, 32, 64, 128, 256, 384] and varlen[-3:] == [1536, 1792, 2048]
    assert varlen_graph_sizes(100) == [16, 32, 64, 100] and varlen_graph_sizes(0) == []
    assert padded_batch_size(513, varlen) == 640


def test_padded_decode_step_writes_nothing_and_attends_to_nothing() -> None:
    inputs = StepInputs(max_tokens=32, max_seqs=8, max_pages=4, block_size=4,
                        device=torch.device("cpu"))
    chunks = [chunk([1, 2, 3, 4, 5], [7, 3], 4, 1), chunk([9, 8, 7], [5], 2, 1),
              chunk(list(range(10)), [1, 2, 6], 9, 1)]
    batch = inputs.build(chunks, pad_rows=4)
    meta = batch.attention
    assert meta.decode_only and meta.max_query_len == 1 and batch.num_seqs == 3
    assert batch.input_ids.tolist() == [5, 7, 9, 0]
    assert batch.positions.tolist() == [4, 2, 9, 0]
    # Slot = page * block_size + offset; the padding row stores nothing.
    assert meta.slot_mapping.tolist() == [3 * 4 + 0, 5 * 4 + 2, 6 * 4 + 1, -1]
    assert meta.seq_lens.tolist() == [5, 3, 10, 0]
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert meta.block_tables[:3, :3].tolist() == [[7, 3, 0], [5, 0, 0], [1, 2, 6]]
    assert batch.logits_indices.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="pad"):
        inputs.build(chunks, pad_rows=4, pad_tokens=8)  # a decode step pads rows only
    with pytest.raises(ValueError, match="pad"):
        inputs.build([chunk([1, 2, 3], [0], 0, 3)], pad_rows=4, pad_tokens=2)


def test_padded_varlen_step_adds_tokens_of_no_sequence_and_empty_rows() -> None:
    inputs = StepInputs(max_tokens=32, max_seqs=8, max_pages=4, block_size=4,
                        device=torch.device("cpu"))
    chunks = [chunk(list(range(100, 110)), [2, 0, 3], 0, 6), chunk([7, 7, 7], [5], 2, 1)]
    batch = inputs.build(chunks, pad_rows=5, pad_tokens=10)
    meta = batch.attention
    assert not meta.decode_only and batch.num_seqs == 2 and batch.layout.num_tokens == 10
    assert batch.input_ids.tolist() == [100, 101, 102, 103, 104, 105, 7, 0, 0, 0]
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 5, 2, 0, 0, 0]
    assert meta.slot_mapping.tolist() == [8, 9, 10, 11, 0, 1, 22, -1, -1, -1]
    # Padding rows hold no query tokens and attend to nothing.
    assert meta.query_start_loc.tolist() == [0, 6, 7, 7, 7, 7]
    assert meta.seq_lens.tolist() == [6, 3, 0, 0, 0]
    assert batch.logits_indices.tolist() == [6]  # the first chunk is mid-prompt


def test_mixed_step_flat_batch() -> None:
    inputs = StepInputs(max_tokens=32, max_seqs=8, max_pages=4, block_size=4,
                        device=torch.device("cpu"))
    # A chunk mid-prompt (does not sample), a prompt's last chunk and a decode row.
    chunks = [chunk(list(range(100, 110)), [2, 0, 3], 0, 6),
              chunk([1, 2, 3, 4, 5, 6], [1, 4], 4, 2), chunk([7, 7, 7], [5], 2, 1)]
    batch = inputs.build(chunks)
    meta = batch.attention
    assert not meta.decode_only and meta.max_query_len == 6
    assert batch.input_ids.tolist() == [100, 101, 102, 103, 104, 105, 5, 6, 7]
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 2]
    assert meta.slot_mapping.tolist() == [8, 9, 10, 11, 0, 1, 16, 17, 22]
    assert meta.query_start_loc.tolist() == [0, 6, 8, 9]
    assert meta.seq_lens.tolist() == [6, 6, 3]
    assert batch.logits_indices.tolist() == [7, 8]


def test_block_table_mirror_tracks_growth_replacement_and_absence() -> None:
    mirror = BlockTableMirror(max_seqs=2, max_pages=4)
    a = Sequence(EngineRequest("a", [1]), 0, 0)
    b = Sequence(EngineRequest("b", [1]), 1, 0)
    a.block_ids, b.block_ids = [3], [4, 5]
    rows = mirror.rows([a, b])
    a.block_ids.append(9)  # grows in place
    b.block_ids = [6]  # replaced (preempted and readmitted)
    rows = mirror.rows([b, a])
    assert mirror.table[rows[0], :1].tolist() == [6]
    assert mirror.table[rows[1], :2].tolist() == [3, 9]
    c = Sequence(EngineRequest("c", [1]), 2, 0)
    c.block_ids = [8, 1, 2]
    rows = mirror.rows([c, a])  # b is absent: its row is free again
    assert mirror.table[rows[0], :3].tolist() == [8, 1, 2]
    assert mirror.table[rows[1], :2].tolist() == [3, 9]


def test_graph_path_on_cpu_equals_eager(tiny_checkpoint, make_core, greedy, prompts) -> None:
    """The graph path (padding, static buffers, replay) with the CPU stand-in for capture."""
    model_dir = tiny_checkpoint("qwen3")
    eager = greedy(make_core(model_dir, device="cpu"), prompts, 10, True)
    core = make_core(model_dir, device="cpu")
    replays: list[int] = []

    def counting_capture(run):
        def replay():
            replays.append(1)
            return run()
        return replay

    # The prompts (87 tokens) go through a 16-token budget: every prefill/mixed step replays
    # a varlen graph of 16 tokens in 8 rows, every decode step a padded decode graph.
    core.runner.capture_graphs(graph_batch_sizes(8), varlen_graph_sizes(16), counting_capture,
                               progress=False)
    assert greedy(core, prompts, 10, True) == eager
    assert len(replays) >= 6 + 9
    assert core.runner.graphs is not None and core.runner.graphs.padded_size(5) == 8
    assert core.runner.varlen_graphs is not None and core.runner.varlen_graphs.sizes == [16]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="the Triton backend runs on the CPU only in Triton's interpreter")
def test_triton_backend_in_interpreter_equals_torch(tiny_checkpoint, make_core, greedy,
                                                    prompts, monkeypatch) -> None:
    model_dir = tiny_checkpoint("qwen3")
    reference = greedy(make_core(model_dir, device="cpu"), prompts[:3], 4)
    monkeypatch.setenv("LLMSERVE_TRITON_ON_CPU", "1")
    core = make_core(model_dir, device="cpu", attention_backend="triton")
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


def test_kv_budget_arithmetic() -> None:
    memory = MemorySnapshot(total=80 * GIB, free=75 * GIB, peak_allocated=4 * GIB,
                            allocated=2 * GIB, non_torch=GIB // 2)
    blocks = num_kv_blocks(memory, 0.9, block_bytes=GIB // 64)
    assert blocks == int((0.9 * 80 - 4 - 0.5) * 64)
    # Another process holds most of the device: the free memory caps the budget.
    crowded = MemorySnapshot(total=80 * GIB, free=10 * GIB, peak_allocated=4 * GIB,
                             allocated=2 * GIB, non_torch=0)
    assert num_kv_blocks(crowded, 0.9, GIB // 64) < 8 * 64
    with pytest.raises(ValueError, match="gpu-memory-utilization"):
        num_kv_blocks(memory, 0.05, GIB // 64)


def test_profile_batch_shape() -> None:
    chunks = dummy_chunks(num_tokens=1000, num_seqs=256, block_size=16)
    assert len(chunks) == 256 and sum(c.num_tokens for c in chunks) == 1000
    assert all(c.samples and set(c.seq.block_ids) == {0} for c in chunks)
    assert all(len(c.seq.block_ids) * 16 >= c.num_tokens for c in chunks)
