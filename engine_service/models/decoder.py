"""The Qwen3 / Qwen2 / Llama decoder: one module, switched by bias and q/k-norm flags.

Every non-matmul operation goes through a `KernelOps` chosen once at start-up: the torch twins
on the CPU, the Triton kernels on CUDA.
"""

from collections.abc import Iterable

import torch
from torch import nn

from llmserve.engine_service.attention import PagedAttention
from llmserve.engine_service.checkpoint import CheckpointError, ModelSpec
from llmserve.engine_service.models.rope import rope_inv_freq
from llmserve.kernels.ops import TORCH_OPS, KernelOps
from llmserve.kernels.rotary import rotary_cos_sin


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale."""

    def __init__(self, size: int, eps: float, ops: KernelOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one pass."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    """Self-attention with fused QKV, optional per-head q/k RMSNorm (Qwen3), rotary, paged KV."""

    def __init__(self, spec: ModelSpec, layer: int, ops: KernelOps) -> None:
        super().__init__()
        self.layer = layer
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = (
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
        )
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.qkv_proj = nn.Linear(
            spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=False)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, ops) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, ops) if spec.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        attention: PagedAttention,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.apply_rotary(positions, q, k, cos_sin)
        out = attention.forward(self.layer, q, k, v)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection."""

    def __init__(self, spec: ModelSpec, ops: KernelOps) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block; the residual add is fused into the following norm."""

    def __init__(self, spec: ModelSpec, layer: int, ops: KernelOps) -> None:
        super().__init__()
        self.self_attn = Attention(spec, layer, ops)
        self.mlp = MLP(spec, ops)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        attention: PagedAttention,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.add_forward(x, residual)
        x = self.self_attn(x, positions, cos_sin, attention)
        x, residual = self.post_attention_layernorm.add_forward(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head over one flat batch of tokens."""

    def __init__(self, spec: ModelSpec, ops: KernelOps = TORCH_OPS) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, ops) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
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
        x = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.cos_sin, attention)
        assert residual is not None
        x, _ = self.norm.add_forward(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies Hugging Face tensors into this module, fusing q/k/v and gate/up as it goes."""
        params = dict(self.named_parameters())
        fused = {
            "q_proj": ("qkv_proj", 0),
            "k_proj": ("qkv_proj", 1),
            "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        }
        loaded: set[str] = set()
        for name, tensor in weights:
            target = name.removeprefix("model.")
            if "rotary_emb" in target or (
                target == "lm_head.weight" and self.spec.tie_word_embeddings
            ):
                continue
            parts = target.split(".")
            shard = None
            if len(parts) >= 2 and parts[-2] in fused:
                parts[-2], shard = fused[parts[-2]]
                target = ".".join(parts)
            if target not in params:
                raise CheckpointError(f"unexpected tensor {name!r} in checkpoint")
            param = params[target]
            with torch.no_grad():
                if shard is None:
                    param.copy_(tensor)
                else:
                    offsets = self._shard_offsets(parts[-2])
                    start, size = offsets[shard]
                    param[start : start + size].copy_(tensor)
            loaded.add(f"{target}#{shard}")
        expected = self._expected_tensors()
        missing = expected - loaded
        if missing:
            raise CheckpointError(f"checkpoint lacks tensors: {sorted(missing)[:5]}")

    def _shard_offsets(self, fused_name: str) -> list[tuple[int, int]]:
        spec = self.spec
        if fused_name == "gate_up_proj":
            return [(0, spec.intermediate_size), (spec.intermediate_size, spec.intermediate_size)]
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        return [(0, q), (q, kv), (q + kv, kv)]

    def _expected_tensors(self) -> set[str]:
        expected: set[str] = set()
        for name, _ in self.named_parameters(remove_duplicate=True):
            if "qkv_proj" in name:
                expected.update(f"{name}#{i}" for i in range(3))
            elif "gate_up_proj" in name:
                expected.update(f"{name}#{i}" for i in range(2))
            else:
                expected.add(f"{name}#None")
        return expected
