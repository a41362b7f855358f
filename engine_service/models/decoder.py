"""The Qwen3 / Qwen2 / Llama decoder: one module, switched by bias and q/k-norm flags."""

from collections.abc import Iterable

import torch
from torch import nn

from llmserve.engine_service.attention import AttentionBackend
from llmserve.engine_service.checkpoint import CheckpointError, ModelSpec
from llmserve.engine_service.models.rope import rope_inv_freq
from llmserve.kernels.activation import silu_and_mul_torch
from llmserve.kernels.rms_norm import add_rms_norm_torch, rms_norm_torch
from llmserve.kernels.rotary import apply_rotary_torch, rotary_cos_sin


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_torch(x, self.weight, self.eps)


class Attention(nn.Module):
    """Self-attention with fused QKV, optional per-head q/k RMSNorm (Qwen3), rotary, paged KV."""

    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.layer = layer
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
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_torch(positions, q, k, cos_sin)
        out = backend.forward(self.layer, q, k, v)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul_torch(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block; the residual add is fused into the following norm."""

    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(spec, layer)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = add_rms_norm_torch(
                x, residual, self.input_layernorm.weight, self.input_layernorm.eps
            )
        x = self.self_attn(x, positions, cos_sin, backend)
        x, residual = add_rms_norm_torch(
            x, residual, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps
        )
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head over one flat batch of tokens."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq = rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling)
        self.register_buffer(
            "cos_sin",
            rotary_cos_sin(spec.head_dim, spec.max_position_embeddings, inv_freq),
            persistent=False,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        """Returns the final hidden states [T, hidden] for the flat batch."""
        x = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.cos_sin, backend)
        assert residual is not None
        x, _ = add_rms_norm_torch(x, residual, self.norm.weight, self.norm.eps)
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
