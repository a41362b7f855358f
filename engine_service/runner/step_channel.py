"""Rank 0 tells the other ranks what to run: a fixed-size header, then the step's inputs.

Each step rank 0's scheduler builds the flat batch into the runner's int32 input buffer; the
other ranks receive the used part of that buffer into their own (same layout), so they run
the same forward pass without a scheduler and without pickling anything. The header travels
over gloo (host ints); the buffer over NCCL straight into GPU memory, or gloo on the CPU.
"""

from dataclasses import astuple
from enum import IntEnum

import torch
import torch.distributed as dist

from llmserve.engine_service.parallel.group import TensorParallelGroup
from llmserve.engine_service.runner.step_inputs import BatchLayout, StepInputs

HEADER_INTS = 128  # CAPTURE_GRAPHS: 35 decode sizes and the varlen ladder up to 16,384 tokens


class Op(IntEnum):
    """What the other ranks do next; each mirrors one `ModelRunner` method."""

    STEP = 1  # args: BatchLayout fields, then 1 if the decode graph is replayed
    ALLOCATE_KV_CACHE = 2  # args: number of blocks
    CAPTURE_GRAPHS = 3  # args: batch sizes
    WARM_UP_DECODE = 4  # args: batch sizes
    STOP = 5


class StepChannel:
    """Rank 0's `publish` and the other ranks' `receive`; a no-op in a group of one."""

    def __init__(self, tp: TensorParallelGroup, inputs: StepInputs) -> None:
        self.tp, self.inputs = tp, inputs
        self.header = torch.zeros(HEADER_INTS, dtype=torch.int64)

    def publish(self, op: Op, args: list[int] | tuple[int, ...] = (),
                layout: BatchLayout | None = None) -> None:
        """Rank 0: sends `op` (and, for a step, the inputs already in the buffer)."""
        if self.tp.size == 1 or not self.tp.leader:
            return
        if len(args) + 2 > HEADER_INTS:
            raise ValueError(f"{op.name} has {len(args)} arguments; the header holds "
                             f"{HEADER_INTS - 2}")
        self.header[0], self.header[1] = op, len(args)
        self.header[2 : 2 + len(args)] = torch.tensor(args, dtype=torch.int64)
        dist.broadcast(self.header, src=0, group=self.tp.control)
        if layout is not None:
            self._broadcast_inputs(layout.end)

    def receive(self) -> tuple[Op, list[int]]:
        """Other ranks: waits for the next op; a step's inputs land in the input buffer."""
        dist.broadcast(self.header, src=0, group=self.tp.control)
        op, count = Op(int(self.header[0])), int(self.header[1])
        args = self.header[2 : 2 + count].tolist()
        if op == Op.STEP:
            self._broadcast_inputs(step_layout(args).end)
        return op, args

    def _broadcast_inputs(self, end: int) -> None:
        if self.inputs.device_buffer.is_cuda:
            dist.broadcast(self.inputs.device_buffer[:end], src=0)
        else:
            dist.broadcast(self.inputs.host[:end], src=0, group=self.tp.control)


def step_args(layout: BatchLayout, graphed: bool) -> list[int]:
    return [int(v) for v in astuple(layout)] + [int(graphed)]


def step_layout(args: list[int]) -> BatchLayout:
    fields = list(args[:8])
    fields[4] = bool(fields[4])
    return BatchLayout(*fields)
