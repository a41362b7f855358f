"""The tensor-parallel linear layers with FP8 weights (W8A8): drop-ins for the column- and
row-parallel layers, sharded the same way.

Each holds e4m3 weights and float32 per-output-channel scales [out, 1] (a fused layer's parts
each bring their own rows of both). A checkpoint's FP8 tensors are copied as they are; a float
weight is quantized per output channel as it loads (`--quantization fp8`); a weight with a scale
per block (FP8_BLOCK) is read whole with its scales, dequantized and quantized again per output
channel, then sharded like the others. On CUDA the matmul runs in FP8 (kernels/fp8_linear.py;
one token's is weight-only); on the CPU the weight is dequantized once, after loading, and each
matmul rounds its input per token as the GPU path does for more tokens. Where the input is
rounded, the norm or activation before the layer may hand it over rounded (QuantizedRows).
QKV and gate/up hand their output unscaled to the op after them (RoPE-and-store,
SiLU-and-mul), and on one GPU so do the row-parallel layers (o, down) to the residual add
(UnscaledProduct).
"""

import torch
from torch import nn

from llmserve.engine_service.models.checkpoint import CheckpointError
from llmserve.engine_service.parallel.group import TensorParallelGroup
from llmserve.engine_service.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorSource,
)
from llmserve.kernels.fp8_linear import (
    FP8_DTYPE,
    QuantizedRows,
    UnscaledProduct,
    dequantize_rows,
    fp8_linear,
    fp8_linear_torch,
    fp8_linear_unscaled,
    quantize_rows,
)


class Fp8Weights(nn.Module):
    """The FP8 weight and its scales, their loading and the matmul, shared by both layers."""

    weight: nn.Parameter
    weight_scale: nn.Parameter | None

    def init_fp8(self, out_features: int, in_features: int, quantize_at_load: bool,
                 block: tuple[int, int] | None) -> None:
        # Replaces the float weight the parallel layer just made (one layer's worth at a time).
        self.compute_dtype = torch.get_default_dtype()
        self.quantize_at_load, self.block = quantize_at_load, block
        # A block-scaled part's whole weight or scales, until the other one arrives.
        self._halves: dict[int, dict[str, torch.Tensor]] = {}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, 1, dtype=torch.float32),
                                         requires_grad=False)

    def store(self, name: str, rows: slice, tensor: torch.Tensor) -> None:
        """Copies a checkpoint tensor's share into `rows` of parameter `name`."""
        assert self.weight_scale is not None, "loaded after finish_loading"
        if name == "weight_scale":
            tensor = tensor.reshape(-1, 1)
        elif name == "weight" and tensor.dtype != FP8_DTYPE:
            if not self.quantize_at_load:
                raise CheckpointError(
                    f"is {str(tensor.dtype).removeprefix('torch.')}, but the checkpoint's "
                    "quantization_config says its linear weights are float8_e4m3fn"
                )
            tensor, scale = quantize_rows(tensor.to(self.weight.device))
            self.weight_scale.data[rows].copy_(scale)
        getattr(self, name).data[rows].copy_(tensor)

    def requantized(self, name: str, part: int, source: TensorSource
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A block-scaled part's whole weight quantized per output channel (e4m3 [out, in],
        scales [out, 1]) once both its weight and its scales have arrived; None before."""
        halves = self._halves.setdefault(part, {})
        halves[name] = source[:].to(self.weight.device)
        if len(halves) < 2:
            return None
        del self._halves[part]
        weight, scale = halves["weight"], halves["weight_scale"]
        assert self.block is not None
        rows, columns = self.block
        per_element = (scale.float().repeat_interleave(rows, 0)[: weight.shape[0]]
                       .repeat_interleave(columns, 1)[:, : weight.shape[1]])
        return quantize_rows(weight.float() * per_element)

    def finish_loading(self) -> None:
        """On the CPU (no FP8 matmul) keeps the weight dequantized to the compute dtype."""
        if self._halves:
            raise CheckpointError(f"lacks the weight or the scales of parts {list(self._halves)}")
        if self.weight.device.type == "cpu" and self.weight_scale is not None:
            weight = dequantize_rows(self.weight, self.weight_scale, self.compute_dtype)
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.weight_scale = None

    def matmul(self, x: torch.Tensor | QuantizedRows, bias: torch.Tensor | None
               ) -> torch.Tensor:
        if self.weight_scale is None:
            return fp8_linear_torch(x, self.weight, bias)
        return fp8_linear(x, self.weight, self.weight_scale, bias)


class Fp8ColumnParallelLinear(Fp8Weights, ColumnParallelLinear):
    """`ColumnParallelLinear` with FP8 weights: this rank's rows of every fused part, and the
    same rows of the scales. `unscaled_from`: from this many tokens on, the op after it
    applies the scales (QKV's and gate/up's do; any number of ranks, as each rank's columns
    carry their own scales); None: never."""

    def __init__(self, in_features: int, parts: list[int], bias: bool,
                 tp: TensorParallelGroup, quantize_at_load: bool,
                 block: tuple[int, int] | None = None, unscaled_from: int | None = None
                 ) -> None:
        ColumnParallelLinear.__init__(self, in_features, parts, bias, tp)
        self.init_fp8(sum(self.local_parts), in_features, quantize_at_load, block)
        self.unscaled_from = None if bias else unscaled_from

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor | UnscaledProduct:
        if self.unscaled_from is not None and self.weight_scale is not None:
            return fp8_linear_unscaled(x, self.weight, self.weight_scale, self.unscaled_from)
        return self.matmul(x, self.bias)

    def load(self, name: str, part: int, source: TensorSource) -> None:
        size = self.local_parts[part]
        offset = sum(self.local_parts[:part])
        start = self.tp.rank * size
        rows = slice(offset, offset + size)
        if self.block is not None and name in ("weight", "weight_scale"):
            whole = self.requantized(name, part, source)
            if whole is not None:
                self.store("weight", rows, whole[0][start : start + size])
                self.store("weight_scale", rows, whole[1][start : start + size])
            return
        self.store(name, rows, source[start : start + size])


class Fp8RowParallelLinear(Fp8Weights, RowParallelLinear):
    """`RowParallelLinear` with FP8 weights: this rank's input columns, and every output
    channel's scale (each rank scales its partial sums before they are all-reduced)."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallelGroup,
                 quantize_at_load: bool, block: tuple[int, int] | None = None) -> None:
        RowParallelLinear.__init__(self, in_features, out_features, tp)
        self.init_fp8(out_features, self.local_in, quantize_at_load, block)

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor | UnscaledProduct:
        """On one GPU the output goes to the residual add unscaled (UnscaledProduct) above one
        row; under tensor parallelism each rank's partial sums are scaled before the
        all-reduce, since each rank's input rows have their own scales."""
        if self.tp.size == 1 and self.weight_scale is not None:
            return fp8_linear_unscaled(x, self.weight, self.weight_scale)
        return self.tp.all_reduce(self.matmul(x, None))

    def load(self, name: str, part: int, source: TensorSource) -> None:
        start = self.tp.rank * self.local_in
        if self.block is not None:
            whole = self.requantized(name, part, source)
            if whole is not None:
                self.store("weight", slice(None), whole[0][:, start : start + self.local_in])
                self.store("weight_scale", slice(None), whole[1])
            return
        share = source[:] if name == "weight_scale" else source[:, start : start + self.local_in]
        self.store(name, slice(None), share)
