"""The sampler's per-row inputs: values in step order, every row 16-byte aligned whatever the
row count (Triton compiles a kernel once per pointer alignment)."""

import pytest
import torch

from llmserve.engine_service.core.sampling_rows import sampling_batch
from llmserve.engine_service.core.scheduler import ScheduledChunk
from llmserve.engine_service.core.sequence import Sequence
from llmserve.engine_service.runner.logits_processors import LogitsProcessors
from llmserve.engine_service.seam import EngineRequest, SamplingOptions


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
def test_rows_hold_each_sequence_in_order_and_start_aligned(rows: int) -> None:
    seqs = [Sequence(EngineRequest(f"r{i}", [1] * (3 + i),
                                   SamplingOptions(temperature=0.5 + i, top_k=i)), 0, seed=7 + i)
            for i in range(rows)]
    chunks = [ScheduledChunk(seq, 0, seq.num_tokens) for seq in seqs]
    processors = LogitsProcessors(32, [0], torch.device("cpu"))
    batch = sampling_batch(chunks, torch.device("cpu"), processors, None, lambda seq: True)
    assert batch.temperature.tolist() == [0.5 + i for i in range(rows)]
    assert batch.top_k.tolist() == list(range(rows))
    assert batch.seeds.tolist() == [7 + i for i in range(rows)]
    assert batch.positions.tolist() == [3 + i for i in range(rows)]
    for column in (batch.temperature, batch.top_p, batch.min_p, batch.top_k, batch.seeds,
                   batch.positions):
        assert column.data_ptr() % 16 == 0
