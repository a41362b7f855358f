"""The tensor-parallel process group: this process's rank, the collectives the model needs.

A group of size 1 without `torch.distributed` is the plain single-process engine: every
collective returns its input. The distributed path initialises `torch.distributed` (NCCL for
CUDA tensors, gloo on the CPU) plus a gloo group for the host-side step messages, also at size 1
when asked for, so that path can be measured against the plain one.
"""

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Collectives wait this long for a peer before failing; a dead peer is noticed by the
# supervising processes long before that.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass
class TensorParallelGroup:
    """One rank's view of the group; `distributed` says whether torch.distributed is in use."""

    rank: int = 0
    size: int = 1
    distributed: bool = False
    control: dist.ProcessGroup | None = None  # gloo: step headers and host payloads

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums `x` over the ranks in place (row-parallel outputs, the vocab-split embedding)."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather_columns(self, x: torch.Tensor, full: int) -> torch.Tensor | None:
        """Concatenates every rank's column shard [.., n] into [.., full] on rank 0 (None on
        the others); shards are equal-sized, the last one padded past `full`."""
        if self.size == 1:
            return x[..., :full]
        shards = [torch.empty_like(x) for _ in range(self.size)] if self.leader else None
        dist.gather(x.contiguous(), shards, dst=0)
        if shards is None:
            return None
        return torch.cat(shards, dim=-1)[..., :full]

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def join_group(rank: int, size: int, port: int, device: torch.device) -> TensorParallelGroup:
    """Joins the group at 127.0.0.1:`port` (rank 0 listens there); returns when all joined."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    # The first collective sets up the communicators; doing it here keeps it out of any
    # CUDA-graph capture.
    dist.all_reduce(torch.zeros(1, device=device))
    return TensorParallelGroup(rank, size, True, control)
