"""Which weight quantization the decoder's linear layers use: the checkpoint's own (its
config.json `quantization_config`), or `--quantization fp8` applied as an unquantized checkpoint
loads.

Supported: FP8 W8A8 as llm-compressor's FP8_DYNAMIC scheme writes it in the compressed-tensors
format (e4m3 weights with per-output-channel scales, `weight_scale`; activations quantized per
token at run time), and its FP8_BLOCK scheme (a scale per 128x128 block of a weight), whose
weights are quantized again per output channel as they load so that one matmul serves both
(activations per token, not per 128-wide group); either with or without an FP8
`kv_cache_scheme`. transformers' own block-wise format (`quant_method: fp8`, 128x128 blocks,
dynamic activations, scales in `weight_scale_inv`) holds the same tensors under another name and
loads the same way. A compressed-tensors checkpoint's per-tensor
KV scales (`k_scale`, `v_scale`) are read past: `--kv-cache-dtype fp8_e4m3` scales each cached
row by its own largest value, which needs no calibration and measures better (docs/operations.md).
Any other scheme stops start-up with a message naming it.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llmserve.engine_service.models.checkpoint import CheckpointError
from llmserve.engine_service.models.fp8_layers import Fp8ColumnParallelLinear, Fp8RowParallelLinear
from llmserve.engine_service.parallel.group import TensorParallelGroup
from llmserve.engine_service.parallel.layers import ColumnParallelLinear, RowParallelLinear
from llmserve.kernels.e4m3 import FP8_MIN_CAPABILITY

SUPPORTED = ("compressed-tensors FP8 with per-channel weight scales and dynamic per-token "
             "activations (llm-compressor's FP8_DYNAMIC) or with 128x128 block weight scales and "
             "dynamic 128-wide activation groups (FP8_BLOCK), Hugging Face 'fp8' with 128x128 "
             "blocks and dynamic activations, or an unquantized checkpoint")
# What each compressed-tensors argument set must say (the FP8_DYNAMIC scheme).
WEIGHT_ARGS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
               "dynamic": False, "group_size": None, "block_structure": None}
ACTIVATION_ARGS = {**WEIGHT_ARGS, "strategy": "token", "dynamic": True}
# The FP8_BLOCK scheme's: its weights are re-quantized per output channel as they load.
BLOCK = (128, 128)
BLOCK_WEIGHT_ARGS = {**WEIGHT_ARGS, "strategy": "block", "block_structure": list(BLOCK)}
GROUP_ACTIVATION_ARGS = {**ACTIVATION_ARGS, "strategy": "group", "group_size": BLOCK[1]}


class Fp8UnavailableError(ValueError):
    """FP8 weights were asked for on a device that cannot run them."""


@dataclass(frozen=True)
class WeightQuantization:
    """How the linear layers hold their weights; builds them."""

    fp8: bool = False
    # The checkpoint's weights are float: quantize them as they load.
    quantize_at_load: bool = False
    # The checkpoint holds calibrated per-tensor KV scales, which the loader reads past.
    kv_scales: bool = False
    # The checkpoint's FP8 weights have a scale per block of this shape (FP8_BLOCK): each is
    # dequantized and quantized again per output channel as it loads.
    block: tuple[int, int] | None = None
    # What the checkpoint calls a weight's scale tensor (transformers' format: weight_scale_inv).
    scale_name: str = "weight_scale"

    def column(self, in_features: int, parts: list[int], bias: bool,
               tp: TensorParallelGroup, unscaled_from: int | None = None
               ) -> ColumnParallelLinear:
        """`unscaled_from`: from this many tokens on, the op after the layer takes an FP8
        product before its scales."""
        if self.fp8:
            return Fp8ColumnParallelLinear(in_features, parts, bias, tp, self.quantize_at_load,
                                           self.block, unscaled_from)
        return ColumnParallelLinear(in_features, parts, bias, tp)

    def row(self, in_features: int, out_features: int,
            tp: TensorParallelGroup) -> RowParallelLinear:
        if self.fp8:
            return Fp8RowParallelLinear(in_features, out_features, tp, self.quantize_at_load,
                                        self.block)
        return RowParallelLinear(in_features, out_features, tp)

    @property
    def name(self) -> str:
        if not self.fp8:
            return "none"
        if self.block is not None:
            return "fp8 (checkpoint's blocks, per channel)"
        return "fp8 (quantized at load)" if self.quantize_at_load else "fp8 (checkpoint)"


NO_QUANTIZATION = WeightQuantization()


def read_weight_quantization(model_dir: Path, requested: str) -> WeightQuantization:
    """The checkpoint's quantization if it has one (whatever `requested` says), else
    `requested` ('none' or 'fp8') applied at load time."""
    config = json.loads((model_dir / "config.json").read_text())
    declared = config.get("quantization_config")
    if declared is None:
        return WeightQuantization(True, True) if requested == "fp8" else NO_QUANTIZATION
    if declared.get("quant_method") == "fp8":
        return WeightQuantization(fp8=True, block=check_hf_fp8(declared),
                                  scale_name="weight_scale_inv")
    kv_scales = check_kv_cache_scheme(declared)
    if kv_scales and not declared.get("config_groups"):  # KV scales alone: float weights
        return WeightQuantization(requested == "fp8", requested == "fp8", kv_scales=True)
    block = check_compressed_tensors_fp8(declared)
    return WeightQuantization(fp8=True, kv_scales=kv_scales, block=block)


def check_kv_cache_scheme(declared: dict) -> bool:
    """Whether a compressed-tensors checkpoint declares FP8 KV scales (raises CheckpointError
    naming any other KV scheme)."""
    scheme = declared.get("kv_cache_scheme")
    if not scheme:
        return False
    if declared.get("quant_method") != "compressed-tensors" or scheme.get("num_bits") != 8 or (
            scheme.get("type") != "float"):
        raise _unsupported(f"kv_cache_scheme {scheme.get('num_bits')}-bit {scheme.get('type')} "
                           f"{scheme.get('strategy')}")
    return True


def check_hf_fp8(declared: dict) -> tuple[int, int]:
    """The block shape of transformers' `fp8` format (FineGrainedFP8Config), or CheckpointError
    naming what is not supported: blocks other than 128x128, static activations, power-of-two
    scales, or layers other than the LM head left unquantized."""
    block = declared.get("weight_block_size")
    if block is None or tuple(block) != BLOCK:
        raise _unsupported(f"Hugging Face 'fp8' with weight_block_size {block}")
    for key, supported in (("activation_scheme", "dynamic"), ("scale_fmt", "float")):
        if declared.get(key, supported) != supported:
            raise _unsupported(f"Hugging Face 'fp8' with {key} {declared[key]!r}")
    unconverted = [m for m in declared.get("modules_to_not_convert") or [] if m != "lm_head"]
    if unconverted or declared.get("modules_to_convert"):
        raise _unsupported(f"Hugging Face 'fp8' leaving out layers "
                           f"{unconverted or declared['modules_to_convert']}")
    return BLOCK


def check_compressed_tensors_fp8(declared: dict) -> tuple[int, int] | None:
    """Raises CheckpointError naming the scheme unless `declared` is FP8_DYNAMIC or FP8_BLOCK
    on every linear layer but the LM head; FP8_BLOCK's block shape, None for FP8_DYNAMIC."""
    method = declared.get("quant_method")
    if method != "compressed-tensors":
        raise _unsupported(f"quant_method {method!r}")
    groups = list((declared.get("config_groups") or {}).values())
    if len(groups) != 1 or groups[0].get("targets") != ["Linear"]:
        raise _unsupported(f"compressed-tensors config_groups {declared.get('config_groups')}")
    group = groups[0]
    format_ = group.get("format") or declared.get("format")
    if format_ != "float-quantized":
        raise _unsupported(f"compressed-tensors format {format_!r}")
    weights = group.get("weights") or {}
    block = BLOCK if weights.get("strategy") == "block" else None
    _check_args("weights", group.get("weights"), BLOCK_WEIGHT_ARGS if block else WEIGHT_ARGS)
    _check_args("input_activations", group.get("input_activations"),
                GROUP_ACTIVATION_ARGS if block else ACTIVATION_ARGS)
    for key in ("output_activations", "sparsity_config", "transform_config"):
        if group.get(key) or declared.get(key):
            raise _unsupported(f"compressed-tensors {key} {group.get(key) or declared[key]}")
    # The LM head is never quantized here; any other layer left out would be a mixed model.
    unquantized = [name for name in declared.get("ignore") or [] if name != "lm_head"]
    if unquantized:
        raise _unsupported(f"compressed-tensors FP8 leaving out layers {unquantized}")
    return block


def _check_args(role: str, args: dict | None, expected: dict) -> None:
    if args is None:
        raise _unsupported(f"compressed-tensors without {role} quantization")
    wrong = {key: args.get(key) for key, value in expected.items() if args.get(key) != value}
    if wrong:
        scheme = (f"{args.get('num_bits')}-bit {args.get('type')} {args.get('strategy')} "
                  f"{'dynamic' if args.get('dynamic') else 'static'}")
        raise _unsupported(f"compressed-tensors {role} {scheme} ({wrong})")


def _unsupported(scheme: str) -> CheckpointError:
    return CheckpointError(f"quantization scheme not supported: {scheme}; supported: {SUPPORTED}")


def check_fp8_device(quantization: WeightQuantization, device: torch.device,
                     dtype: torch.dtype) -> None:
    """Refuses FP8 weights on a GPU without FP8 matmuls, or in a dtype they cannot output (the
    CPU runs them dequantized, in any dtype)."""
    if not quantization.fp8 or device.type == "cpu":
        return
    reason = fp8_unsupported_reason(torch.cuda.get_device_name(device),
                                    torch.cuda.get_device_capability(device))
    if reason:
        raise Fp8UnavailableError(reason)
    if dtype != torch.bfloat16:
        raise Fp8UnavailableError(
            f"FP8 weights compute in bfloat16 on a GPU, not {str(dtype).removeprefix('torch.')}: "
            "use --dtype bfloat16")


def fp8_unsupported_reason(gpu: str, capability: tuple[int, int]) -> str | None:
    """Why `gpu` cannot run FP8 weights, or None if it can."""
    if capability >= FP8_MIN_CAPABILITY:
        return None
    major, minor = capability
    return (f"FP8 weights need a GPU of compute capability 8.9 or newer (Ada, Hopper): {gpu} "
            f"has {major}.{minor}; serve an unquantized checkpoint without --quantization fp8")
