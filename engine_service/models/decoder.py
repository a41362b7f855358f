"""The Qwen3 / Qwen2 / Llama decoder: one module, switched by bias and q/k-norm flags.

Every pointwise operation goes through a `KernelOps` chosen once at start-up: the torch twins
on the CPU, the Triton kernels on CUDA (attention goes through its backend, `PagedAttention`).
Under tensor parallelism each rank builds the same module with its share of the heads, the MLP
columns and the vocabulary.
"""

from collections.abc import Iterable

import torch
from torch import nn

from llmserve.engine_service.attention.layer import PagedAttention
from llmserve.engine_service.models.checkpoint import CheckpointError, ModelSpec
from llmserve.engine_service.models.fp8_layers import Fp8Weights
from llmserve.engine_service.models.quantization import NO_QUANTIZATION, WeightQuantization
from llmserve.engine_service.models.rope import rope_inv_freq
from llmserve.engine_service.parallel.group import TensorParallelGroup
from llmserve.engine_service.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorSource,
    VocabParallelEmbedding,
    split_evenly,
)
from llmserve.kernels.fp8_linear import QuantizedRows, UnscaledProduct, rounds_input
from llmserve.kernels.ops import TORCH_OPS, KernelOps
from llmserve.kernels.rotary import rotary_cos_sin

# Token counts from which an FP8 QKV or gate/up projection hands its product to the kernel
# after it (qkv_rope_store, silu_and_mul_fp8) unscaled, for that kernel to apply the scales.
# Gate/up with SiLU-and-mul is faster scaled up to 128 tokens, where cuBLASLt's row-wise
# scaling costs little and the activation's reading of 24k column scales would (H100 sweep of
# each projection with its consumer, docs/benchmarks.md).
QKV_UNSCALED_FROM = 2
GATE_UP_UNSCALED_FROM = 129


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale."""

    def __init__(self, size: int, eps: float, ops: KernelOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, fp8: bool = False) -> torch.Tensor | QuantizedRows:
        """`fp8`: rounded to e4m3 per token in the same pass, for an FP8 linear."""
        return (self.ops.rms_norm_fp8 if fp8 else self.ops.rms_norm)(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor | UnscaledProduct, residual: torch.Tensor, fp8: bool = False
    ) -> tuple[torch.Tensor | QuantizedRows, torch.Tensor]:
        """(norm(x + residual), x + residual) in one pass (x's scales applied on the way)."""
        add_rms_norm = self.ops.add_rms_norm_fp8 if fp8 else self.ops.add_rms_norm
        return add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    """Self-attention with fused QKV, optional per-head q/k RMSNorm (Qwen3), rotary, paged KV
    (norm, rotary and the K/V store are one op of `PagedAttention`)."""

    def __init__(self, spec: ModelSpec, layer: int, ops: KernelOps,
                 tp: TensorParallelGroup, quant: WeightQuantization) -> None:
        super().__init__()
        self.layer = layer
        num_heads = split_evenly(spec.num_heads, tp.size, "the number of attention heads")
        self.q_size = num_heads * spec.head_dim
        q_full, kv_full = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_proj = quant.column(spec.hidden_size, [q_full, kv_full, kv_full],
                                     spec.attention_bias, tp, QKV_UNSCALED_FROM)
        self.o_proj = quant.row(q_full, spec.hidden_size, tp)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, ops) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, ops) if spec.qk_norm else None

    def forward(
        self,
        x: torch.Tensor | QuantizedRows,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        attention: PagedAttention,
    ) -> torch.Tensor | UnscaledProduct:
        qk_norm = None
        if self.q_norm is not None and self.k_norm is not None:
            qk_norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        out = attention.forward(self.layer, self.qkv_proj(x), positions, cos_sin, qk_norm)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection."""

    def __init__(self, spec: ModelSpec, ops: KernelOps, tp: TensorParallelGroup,
                 quant: WeightQuantization) -> None:
        super().__init__()
        self.ops = ops
        size = spec.intermediate_size
        self.gate_up_proj = quant.column(spec.hidden_size, [size, size], False, tp,
                                         GATE_UP_UNSCALED_FROM)
        self.down_proj = quant.row(size, spec.hidden_size, tp)

    def forward(self, x: torch.Tensor | QuantizedRows, fp8: bool = False
                ) -> torch.Tensor | UnscaledProduct:
        """`fp8`: the activation hands the FP8 down projection its input rounded to e4m3 (and
        takes gate/up's product unscaled from GATE_UP_UNSCALED_FROM tokens; without `fp8`
        gate/up's input is one row, whose product comes scaled)."""
        silu_and_mul = self.ops.silu_and_mul_fp8 if fp8 else self.ops.silu_and_mul
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block; the residual add is fused into the following norm."""

    def __init__(self, spec: ModelSpec, layer: int, ops: KernelOps,
                 tp: TensorParallelGroup, quant: WeightQuantization) -> None:
        super().__init__()
        self.self_attn = Attention(spec, layer, ops, tp, quant)
        self.mlp = MLP(spec, ops, tp, quant)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.fp8 = quant.fp8

    def forward(
        self,
        x: torch.Tensor | UnscaledProduct,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        attention: PagedAttention,
    ) -> tuple[torch.Tensor | UnscaledProduct, torch.Tensor]:
        # An FP8 layer's input rounded in the op before it, where the layer would round it.
        fp8 = self.fp8 and rounds_input(positions.shape[0], positions.device)
        if residual is None:
            assert isinstance(x, torch.Tensor)
            residual, normed = x, self.input_layernorm(x, fp8)
        else:
            normed, residual = self.input_layernorm.add_forward(x, residual, fp8)
        x = self.self_attn(normed, positions, cos_sin, attention)
        normed, residual = self.post_attention_layernorm.add_forward(x, residual, fp8)
        return self.mlp(normed, fp8), residual


# Hugging Face's separate projections -> our fused module and the part within it.
FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
SHARDED = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head over one flat batch of tokens; the
    linear layers hold their weights as `quant` says (the embedding and LM head never
    quantized)."""

    def __init__(self, spec: ModelSpec, ops: KernelOps = TORCH_OPS,
                 tp: TensorParallelGroup | None = None,
                 quant: WeightQuantization = NO_QUANTIZATION) -> None:
        super().__init__()
        tp = tp or TensorParallelGroup()
        self.spec, self.quant = spec, quant
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, i, ops, tp, quant) for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.lm_head = (self.embed_tokens if spec.tie_word_embeddings
                        else VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp))
        inv_freq = rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling)
        # Always fp32 (the rotary kernels read an fp32 table), whatever the weights' dtype.
        self.register_buffer(
            "cos_sin",
            rotary_cos_sin(spec.head_dim, spec.max_position_embeddings, inv_freq).float(),
            persistent=False,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: PagedAttention
    ) -> torch.Tensor:
        """Returns the final hidden states [T, hidden] for the flat batch."""
        x: torch.Tensor | UnscaledProduct = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.cos_sin, attention)
        assert residual is not None
        x, _ = self.norm.add_forward(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [T, vocab] in the weights' dtype on rank 0 (the sampler reads them as they
        are, or in fp32 where it must: no fp32 copy per step); None on the other ranks."""
        return self.lm_head.logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, TensorSource]]) -> None:
        """Copies this rank's share of each Hugging Face tensor into the module, fusing q/k/v
        and gate/up as it goes."""
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, source in weights:
            target = name.removeprefix("model.")
            if "rotary_emb" in target or (
                target == "lm_head.weight" and self.spec.tie_word_embeddings
            ) or (self.quant.kv_scales and target.endswith((".k_scale", ".v_scale"))):
                continue
            module_name, _, param_name = target.rpartition(".")
            if param_name == self.quant.scale_name:
                param_name = "weight_scale"
            path = module_name.split(".")
            part = 0
            if path[-1] in FUSED:
                path[-1], part = FUSED[path[-1]]
            module = modules.get(".".join(path))
            if module is None or not isinstance(getattr(module, param_name, None), nn.Parameter):
                raise CheckpointError(f"unexpected tensor {name!r} in checkpoint")
            with torch.no_grad():
                try:
                    if isinstance(module, SHARDED):
                        module.load(param_name, part, source)
                    else:
                        getattr(module, param_name).copy_(source[:])
                except CheckpointError as error:
                    raise CheckpointError(f"tensor {name!r} {error}") from error
            loaded.add(f"{'.'.join(path)}.{param_name}#{part}")
        missing = self._expected_tensors() - loaded
        if missing:
            names = sorted(_checkpoint_name(m, self.quant.scale_name) for m in missing)
            raise CheckpointError(f"checkpoint lacks tensors: {names[:5]}")
        for module in self.modules():
            if isinstance(module, Fp8Weights):
                module.finish_loading()

    def _expected_tensors(self) -> set[str]:
        expected: set[str] = set()
        for name, _ in self.named_parameters(remove_duplicate=True):
            if name.endswith("weight_scale") and self.quant.quantize_at_load:
                continue
            parts = 3 if "qkv_proj" in name else 2 if "gate_up_proj" in name else 1
            expected.update(f"{name}#{i}" for i in range(parts))
        return expected


def _checkpoint_name(expected: str, scale_name: str) -> str:
    """The Hugging Face name of an expected tensor ('layers.0.self_attn.qkv_proj.weight#1' ->
    'model.layers.0.self_attn.k_proj.weight'), a weight's scale by the checkpoint's name for
    it."""
    name, _, part = expected.partition("#")
    module, _, param = name.rpartition(".")
    if param == "weight_scale":
        param = scale_name
    for separate, (fused, index) in FUSED.items():
        if module.endswith(f".{fused}") and index == int(part):
            module = module.removesuffix(fused) + separate
    return name if name == "lm_head.weight" else f"model.{module}.{param}"
