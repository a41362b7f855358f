"""Tensor-parallel layers: each rank holds a slice of a weight and loads only that slice.

Column-parallel layers split output features (QKV by heads, gate/up by columns) and need no
communication; row-parallel layers split input features and all-reduce their partial sums;
the embedding and the LM head split the vocabulary. A checkpoint tensor arrives as a
safetensors slice (or any tensor), so a rank reads its own rows or columns from the file.
"""

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.engine_service.parallel.group import TensorParallelGroup


class TensorSource(Protocol):
    """A checkpoint tensor that can be read in parts: a safetensors slice or a tensor."""

    def __getitem__(self, index: object) -> torch.Tensor: ...


def split_evenly(full: int, size: int, what: str) -> int:
    if full % size:
        raise ValueError(f"{what} ({full}) is not divisible by tensor_parallel_size {size}")
    return full // size


class ColumnParallelLinear(nn.Module):
    """y = x Aᵀ for this rank's rows of A; `parts` are the fused matrices' full output sizes
    (e.g. q, k, v), each split evenly so every rank holds a contiguous piece of each."""

    def __init__(self, in_features: int, parts: list[int], bias: bool,
                 tp: TensorParallelGroup) -> None:
        super().__init__()
        self.tp = tp
        self.local_parts = [split_evenly(p, tp.size, "a projection's output size")
                            for p in parts]
        out = sum(self.local_parts)
        self.weight = nn.Parameter(torch.empty(out, in_features))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, name: str, part: int, source: TensorSource) -> None:
        size = self.local_parts[part]
        offset = sum(self.local_parts[:part])
        start = self.tp.rank * size
        getattr(self, name).data[offset : offset + size].copy_(source[start : start + size])


class RowParallelLinear(nn.Module):
    """y = Σ_ranks x_r A_rᵀ: this rank's input columns of A, partial sums all-reduced."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.tp = tp
        self.local_in = split_evenly(in_features, tp.size, "a projection's input size")
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))

    def load(self, name: str, part: int, source: TensorSource) -> None:
        start = self.tp.rank * self.local_in
        self.weight.data.copy_(source[:, start : start + self.local_in])


class VocabParallelEmbedding(nn.Module):
    """The token embedding split by vocabulary rows (the last shard padded with zero rows).

    Also the LM head's weight: logits are computed per shard and gathered on rank 0.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.shard = -(-vocab_size // tp.size)
        self.start = tp.rank * self.shard
        self.weight = nn.Parameter(torch.zeros(self.shard, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.shard)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[T, vocab] on rank 0, None on the other ranks."""
        return self.tp.gather_columns(self.shard_logits(hidden), self.vocab_size)

    def shard_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's columns of the logits, [T, shard]."""
        return F.linear(hidden, self.weight)

    def load(self, name: str, part: int, source: TensorSource) -> None:
        end = min(self.start + self.shard, self.vocab_size)
        if end > self.start:
            self.weight.data[: end - self.start].copy_(source[self.start : end])
