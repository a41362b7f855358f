"""A host-side mirror of the running sequences' block tables, updated by what changed.

Converting every sequence's block list to an array every step costs host time per sequence and
per page; in a decode step a sequence gains a page only every block_size tokens, so the mirror
keeps one row per sequence and writes only the new pages.

It relies on how the scheduler changes a sequence's `block_ids`: the list only grows in place
(new pages appended) or is replaced by a new list (admission, preemption). A replaced or
shortened list is written again in full.
"""

from dataclasses import dataclass

import numpy as np

from llmserve.engine_service.runner.chunk import ChunkSequence


@dataclass
class _Row:
    index: int
    block_ids: list[int]  # the list object last seen (identity tells a replaced list)
    written: int  # how many of its entries the row holds


class BlockTableMirror:
    """One int32 row of page ids per sequence of the current step (for up to `max_seqs`)."""

    def __init__(self, max_seqs: int, max_pages: int) -> None:
        # Twice the rows: a step's new sequences take rows before the previous step's absent
        # ones give theirs back, so both sets can be live at once.
        self.table = np.zeros((2 * max_seqs, max_pages), dtype=np.int32)
        self._rows: dict[ChunkSequence, _Row] = {}
        self._free = list(range(2 * max_seqs - 1, -1, -1))

    def rows(self, seqs: list[ChunkSequence]) -> np.ndarray:
        """Brings the rows of `seqs` up to date and returns their indices in `table`.

        Sequences absent from this step give their rows back; if they run again later their
        row is written afresh.
        """
        previous, current = self._rows, {}
        indices = np.empty(len(seqs), dtype=np.int64)
        for i, seq in enumerate(seqs):
            ids = seq.block_ids
            row = previous.pop(seq, None)
            if row is None:
                row = _Row(self._free.pop(), ids, 0)
            elif row.block_ids is not ids or len(ids) < row.written:
                row.block_ids, row.written = ids, 0
            if len(ids) > row.written:
                self.table[row.index, row.written : len(ids)] = ids[row.written :]
                row.written = len(ids)
            current[seq] = row
            indices[i] = row.index
        self._free.extend(row.index for row in previous.values())
        self._rows = current
        return indices
