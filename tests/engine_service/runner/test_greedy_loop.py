"""The draft loop: greedy passes that feed each pick back, on fixed buffers, per pass count."""

import numpy as np
import torch

from llmserve.engine_service.attention.layer import AttentionMetadata
from llmserve.engine_service.runner.cuda_graphs import eager_capture
from llmserve.engine_service.runner.greedy_loop import GreedyDecodeLoop, pass_counts

VOCAB = 50


def test_pass_counts_are_powers_of_two_then_the_most() -> None:
    assert pass_counts(7) == [1, 2, 4, 7]
    assert pass_counts(8) == [1, 2, 4, 8]
    assert pass_counts(1) == [1]
    assert pass_counts(0) == []


def test_each_row_feeds_its_picks_back_until_it_has_what_it_wants() -> None:
    """A model whose next token is its input plus one and whose every pass is recorded: each
    row guesses first + 1, + 2, ...; a row past what it wants stores nothing (slot -1),
    attends to nothing (seq_len 0) and keeps its position; the fewest passes that cover the
    longest row run."""
    passes: list[dict] = []

    def logits_of(ids: torch.Tensor, positions: torch.Tensor,
                  meta: AttentionMetadata) -> torch.Tensor:
        passes.append({"positions": positions.tolist(), "seq_lens": meta.seq_lens.tolist(),
                       "slots": meta.slot_mapping.tolist()})
        return torch.nn.functional.one_hot((ids.long() + 1) % VOCAB, VOCAB).float()

    loop = GreedyDecodeLoop(logits_of, 7, [1, 2, 4], max_pages=4, block_size=4,
                            device=torch.device("cpu"), capture=eager_capture, progress=False)
    tables = np.array([[3, 5, 0, 0], [7, 1, 2, 0]], dtype=np.int32)
    guesses = loop.run(torch.tensor([10, 20]), [5, 9], tables, [3, 2])
    # Three guesses wanted at most: the two-pass graph, not all seven.
    assert guesses.shape == (2, 3)
    assert guesses[0].tolist() == [10, 11, 12]
    assert guesses[1, :2].tolist() == [20, 21]
    assert len(passes) == 2
    first, second = passes
    # Row 0 (position 5, page 5) runs both passes; row 1 (position 9, page 2) only the first.
    assert first["positions"] == [5, 9] and first["seq_lens"] == [6, 10]
    assert first["slots"] == [5 * 4 + 1, 2 * 4 + 1]
    assert second["positions"] == [6, 10] and second["seq_lens"] == [7, 0]
    assert second["slots"] == [5 * 4 + 2, -1]
    # Three rows pad to the four-row graph: the padding row attends to nothing.
    passes.clear()
    loop.run(torch.tensor([1, 2, 3]), [4, 4, 4], np.zeros((3, 4), dtype=np.int32), [2, 2, 2])
    assert passes[0]["seq_lens"] == [5, 5, 5, 0] and passes[0]["slots"][3] == -1
