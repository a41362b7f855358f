"""Structured output's token masks, applied to the logits before any token is drawn.

The core fills one bit per vocabulary id for each row that follows a grammar (bit `t % 32` of
int32 word `t // 32`, as llguidance writes it: 1 = allowed) on the host; here those rows' other
logits become -inf, so temperature, top-k, top-p, min-p and the draw only ever see allowed
tokens. Rows without a grammar are not touched, and a batch without any costs nothing.
"""

from dataclasses import dataclass

import numpy as np
import torch

_BIT_VALUES: dict[torch.device, torch.Tensor] = {}


def _bit_values(device: torch.device) -> torch.Tensor:
    values = _BIT_VALUES.get(device)
    if values is None:
        values = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)
        _BIT_VALUES[device] = values
    return values


def forbidden_tokens(bitmask: torch.Tensor, vocab_size: int, device: torch.device
                     ) -> torch.Tensor:
    """[R, vocab_size] bool, True where a host int32 bitmask [R, ceil(vocab_size / 32)] has a 0
    bit (one pass over the result: this runs on every row that follows a grammar)."""
    if device.type == "cpu":
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, :vocab_size]) == 0
    return forbidden_on_device(bitmask.to(device, non_blocking=True), vocab_size)


def forbidden_on_device(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`forbidden_tokens` of a bitmask already on its device: the words' bytes (little-endian),
    each against its eight bit values, in three elementwise kernels."""
    data = bitmask.view(torch.uint8)
    forbidden = (data.unsqueeze(-1) & _bit_values(bitmask.device)) == 0
    return forbidden.view(bitmask.shape[0], -1)[:, :vocab_size]


@torch.inference_mode()  # logits come from the model's inference-mode pass
def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        rows: list[int] | torch.Tensor) -> None:
    """Sets to -inf, in place, the logits of tokens the bitmask forbids, in rows `rows` of
    `logits` [N, V]: `bitmask[i]` is row `rows[i]`'s mask."""
    forbidden = forbidden_tokens(bitmask, logits.shape[-1], logits.device)
    rows = torch.as_tensor(rows, dtype=torch.int64)
    if len(rows) == logits.shape[0] and bool((rows == torch.arange(len(rows))).all()):
        logits.masked_fill_(forbidden, float("-inf"))
        return
    index = rows.to(logits.device, non_blocking=True)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(forbidden,
                                                                           float("-inf")))


@dataclass
class GrammarBitmask:
    """One step's masks: `bitmask[i]` (host int32) is for row `rows[i]` of the logits."""

    bitmask: torch.Tensor
    rows: list[int]

    def apply(self, logits: torch.Tensor, copy: bool) -> torch.Tensor:
        """`logits` with the forbidden tokens at -inf: changed in place, or in a copy (when the
        logits given are the model's own and log-probabilities will read them)."""
        if copy:
            with torch.inference_mode():
                logits = logits.clone()
        apply_token_bitmask(logits, self.bitmask, self.rows)
        return logits
