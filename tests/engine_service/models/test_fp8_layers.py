"""The FP8 linear layers on the CPU: fused parts keep their own per-channel scales, and every
output stays within e4m3's bound of the float layer's: |Δy_i| <= (2u + u^2) sum_j |w_ij x_j|,
u = 2^-4 (weight and activation each rounded once)."""

import pytest
import torch
import torch.nn.functional as F

from llmserve.engine_service.models.checkpoint import CheckpointError
from llmserve.engine_service.models.fp8_layers import (
    Fp8ColumnParallelLinear,
    Fp8RowParallelLinear,
)
from llmserve.engine_service.parallel.group import TensorParallelGroup
from llmserve.kernels.fp8_linear import quantize_rows

U = 2.0**-4
BOUND = 2 * U + U * U


def _parts() -> list[torch.Tensor]:
    # Parts of very different magnitudes: one scale for all of them would flush the small ones.
    gen = torch.Generator().manual_seed(0)
    sizes = ((32, 1e3), (16, 1e-3), (16, 1.0))
    return [torch.randn(size, 48, generator=gen) * magnitude for size, magnitude in sizes]


def _within_bound(layer: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    x = torch.randn(7, weight.shape[1], generator=torch.Generator().manual_seed(1))
    error = (layer(x) - F.linear(x, weight, bias)).abs()
    assert (error <= BOUND * F.linear(x.abs(), weight.abs()) + 1e-6).all()


def test_column_layer_quantizes_each_fused_part_per_channel_as_it_loads() -> None:
    parts = _parts()
    layer = Fp8ColumnParallelLinear(48, [32, 16, 16], True, TensorParallelGroup(), True)
    biases = [torch.randn(part.shape[0]) for part in parts]
    for i, (part, bias) in enumerate(zip(parts, biases, strict=True)):
        layer.load("weight", i, part)
        layer.load("bias", i, bias)
    layer.finish_loading()
    _within_bound(layer, torch.cat(parts), torch.cat(biases))


def test_checkpoint_fp8_tensors_give_the_same_layer_as_quantizing_at_load() -> None:
    parts = _parts()
    at_load = Fp8ColumnParallelLinear(48, [32, 16, 16], False, TensorParallelGroup(), True)
    stored = Fp8ColumnParallelLinear(48, [32, 16, 16], False, TensorParallelGroup(), False)
    for i, part in enumerate(parts):
        at_load.load("weight", i, part)
        q, scale = quantize_rows(part)
        stored.load("weight", i, q)
        stored.load("weight_scale", i, scale)
    assert torch.equal(at_load.weight.float(), stored.weight.float())
    assert torch.equal(at_load.weight_scale, stored.weight_scale)


def test_row_layer_stays_within_the_bound() -> None:
    weight = torch.randn(24, 80, generator=torch.Generator().manual_seed(2))
    layer = Fp8RowParallelLinear(80, 24, TensorParallelGroup(), False)
    q, scale = quantize_rows(weight)
    layer.load("weight", 0, q)
    layer.load("weight_scale", 0, scale.flatten())  # also as a flat [out] vector
    layer.finish_loading()
    _within_bound(layer, weight, None)


def test_a_float_weight_in_an_fp8_checkpoint_is_refused() -> None:
    layer = Fp8RowParallelLinear(16, 16, TensorParallelGroup(), False)
    with pytest.raises(CheckpointError, match="is float32, but the checkpoint's quantization"):
        layer.load("weight", 0, torch.ones(16, 16))
