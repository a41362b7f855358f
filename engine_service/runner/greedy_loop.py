"""A draft model's guesses after its first: greedy decode passes in a row, each feeding its
argmax to the next, replayed as one CUDA graph per batch size.

A small draft's decode pass costs the GPU a fraction of what launching it from Python costs the
host; one replay runs every pass (and advances the inputs between them) with no host work in
between. Graphs are captured for 1, 2, 4, ... passes up to the most a draft needs, and a replay
runs the fewest that cover the longest draft asked. Each row keeps going while it wants guesses:
a row past its own count stores nothing, attends to nothing and stops advancing, so its position
never leaves the sequence's pages.
"""

from collections.abc import Callable

import numpy as np
import torch

from llmserve.engine_service.attention.layer import AttentionMetadata
from llmserve.engine_service.runner.cuda_graphs import GraphCapture, StepGraphs
from llmserve.engine_service.runner.step_inputs import upload

# (input ids [n], positions [n], decode metadata) -> logits [n, vocab]
LogitsOf = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def pass_counts(most: int) -> list[int]:
    """The pass counts captured: 1, 2, 4, ... below `most`, then `most`."""
    counts = [1 << i for i in range(most.bit_length()) if 1 << i < most]
    return [*counts, most] if most > 0 else []


class GreedyDecodeLoop:
    """Up to `passes` greedy decode passes over up to max(sizes) rows, on fixed-address
    buffers."""

    def __init__(self, logits_of: LogitsOf, passes: int, sizes: list[int], max_pages: int,
                 block_size: int, device: torch.device, capture: GraphCapture,
                 progress: bool = True) -> None:
        n = max(sizes)
        self.logits_of, self.block_size = logits_of, block_size
        self.device = device
        int32 = {"dtype": torch.int32, "device": device}
        self.tokens = torch.zeros(n, **int32)
        self.positions = torch.zeros(n, **int32)
        self.wanted = torch.zeros(n, **int32)  # guesses each row wants in all (0: padding)
        self.seq_lens = torch.zeros(n, **int32)
        self.slots = torch.zeros(n, **int32)
        self.block_tables = torch.zeros(n, max_pages, **int32)
        self.query_start_loc = torch.arange(n + 1, **int32)
        self.out = torch.zeros(n, passes, dtype=torch.int64, device=device)
        self.graphs = {count: StepGraphs(sizes, lambda size, c=count: self._loop(size, c),
                                         capture, f"draft loop x{count}", progress)
                       for count in reversed(pass_counts(passes))}

    def _loop(self, size: int, count: int) -> Callable[[], torch.Tensor]:
        meta = AttentionMetadata(self.query_start_loc[: size + 1], self.seq_lens[:size],
                                 self.block_tables[:size], self.slots[:size],
                                 decode_only=True, max_query_len=1)
        tokens, positions = self.tokens[:size], self.positions[:size]
        wanted, tables, out = self.wanted[:size], self.block_tables[:size], self.out[:size]
        bs, last_page = self.block_size, tables.shape[1] - 1

        def run() -> torch.Tensor:
            for j in range(1, count + 1):
                live = wanted > j
                pages = tables.gather(1, (positions // bs).clamp(max=last_page)[:, None]
                                      .to(torch.int64))[:, 0]
                self.seq_lens[:size] = torch.where(live, positions + 1, 0)
                self.slots[:size] = torch.where(live, pages * bs + positions % bs, -1)
                guess = self.logits_of(tokens, positions, meta).argmax(dim=-1)
                out[:, j - 1] = guess
                tokens.copy_(guess)
                positions.add_(live.to(torch.int32))
            return out

        return run

    def run(self, first: torch.Tensor, positions: list[int], tables: np.ndarray,
            wanted: list[int]) -> torch.Tensor:
        """Row i's guesses [n, >= max(wanted)]: `first[i]` (on the device), the token at
        positions[i] (whose block table is tables[i]), then wanted[i] - 1 more; the columns
        past those are meaningless."""
        n, needed = len(positions), max(wanted) - 1
        if needed <= 0:
            return first[:, None]
        count = min(c for c in self.graphs if c >= needed)
        graphs = self.graphs[count]
        size = graphs.padded_size(n)
        assert size is not None, f"{n} rows exceed the draft loop's {graphs.sizes[-1]}"
        packed = np.zeros((size, 2 + tables.shape[1]), dtype=np.int32)
        packed[:n, 0], packed[:n, 1], packed[:n, 2:] = positions, wanted, tables
        staged = upload(packed, torch.int32, self.device)
        self.positions[:size] = staged[:, 0]
        self.wanted[:size] = staged[:, 1]
        self.block_tables[:size] = staged[:, 2:]
        self.tokens[:n] = first
        out = graphs.replay(size)
        return torch.cat([first[:, None], out[:n, :count]], dim=1)
