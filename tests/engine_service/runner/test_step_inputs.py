"""The fixed-address step inputs: the flat batch of decode, varlen and mixed steps, padded for a
graph replay or not."""

import pytest
import torch

from llmserve.engine_service.core.scheduler import ScheduledChunk
from llmserve.engine_service.core.sequence import Sequence
from llmserve.engine_service.runner.step_inputs import StepInputs, upload
from llmserve.engine_service.seam import EngineRequest


def chunk(tokens: list[int], blocks: list[int], start: int, count: int) -> ScheduledChunk:
    seq = Sequence(EngineRequest(f"s{id(tokens)}", tokens), 0, 0)
    seq.block_ids = blocks
    return ScheduledChunk(seq, start, count)


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
    # The decode kernel's order: longest row first, the padding row last.
    assert meta.decode_order is not None and meta.decode_order.tolist() == [2, 0, 1, 3]
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


def test_prompt_rows_follow_the_block_tables_only_in_a_step_that_scores() -> None:
    inputs = StepInputs(max_tokens=32, max_seqs=8, max_pages=4, block_size=4,
                        device=torch.device("cpu"))
    chunks = [chunk(list(range(100, 110)), [2, 0, 3], 0, 6),
              chunk([1, 2, 3, 4, 5, 6], [1, 4], 4, 2), chunk([7, 7, 7], [5], 2, 1)]
    plain = inputs.build(chunks)
    assert plain.layout.num_prompt_rows == 0 and plain.prompt_rows.numel() == 0
    assert plain.layout.end == inputs.offsets["block_tables"] + 3 * 4  # nothing more to copy
    # The first chunk scores all 6 of its tokens, the second its first (its last is the
    # prompt's last).
    scoring = inputs.build(chunks, pad_rows=5, pad_tokens=16, scored=[(0, 6), (1, 1)])
    assert scoring.prompt_rows.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert scoring.layout.end == inputs.offsets["prompt_rows"] + 7
    assert inputs.view(scoring.layout).prompt_rows.tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_token_rows_give_each_token_of_a_short_chunk_its_own_decode_row() -> None:
    """A draft to verify (the last token and two guesses) and a two-token catch-up: each token
    a decode row over its sequence's pages, attending up to its own position."""
    inputs = StepInputs(max_tokens=32, max_seqs=8, max_pages=4, block_size=4,
                        device=torch.device("cpu"), max_logits_per_seq=3)
    verify = chunk([1, 2, 3, 4, 5], [7, 3], 4, 3)
    verify.draft = [40, 41]
    chunks = [verify, chunk([9, 8, 7], [5], 1, 2)]
    batch = inputs.build(chunks, pad_rows=8, token_rows=True)
    meta = batch.attention
    assert meta.decode_only and meta.max_query_len == 1 and batch.num_seqs == 5
    assert batch.input_ids.tolist() == [5, 40, 41, 8, 7, 0, 0, 0]
    assert batch.positions.tolist() == [4, 5, 6, 1, 2, 0, 0, 0]
    assert meta.seq_lens.tolist() == [5, 6, 7, 2, 3, 0, 0, 0]
    assert meta.slot_mapping.tolist() == [12, 13, 14, 21, 22, -1, -1, -1]
    assert meta.query_start_loc.tolist() == list(range(9))
    assert meta.block_tables[:5, :2].tolist() == [[7, 3]] * 3 + [[5, 0]] * 2
    # The verifying rows each draw; the catch-up draws after its last token.
    assert batch.logits_indices.tolist() == [0, 1, 2, 4]
    assert inputs.chunk_starts([0, 1]).tolist() == [0, 3]
    assert batch.layout.end == inputs.offsets["block_tables"] + 5 * 4


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.int32])
@pytest.mark.parametrize("width", [0, 1, 3, 5, 8])
def test_upload_starts_every_row_of_a_matrix_on_16_bytes(dtype: torch.dtype, width: int) -> None:
    """Kernels take an upload's rows one by one; Triton compiles once per pointer alignment."""
    values = [[r * 10 + c for c in range(width)] for r in range(3)]
    rows = upload(values, dtype, torch.device("cpu"))
    assert rows.dtype == dtype and rows.tolist() == values
    assert all(row.data_ptr() % 16 == 0 for row in rows)
    assert upload([1, 2, 3], dtype, torch.device("cpu")).tolist() == [1, 2, 3]
