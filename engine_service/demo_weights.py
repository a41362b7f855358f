"""The demo model's random weights: the one part of the demo checkpoint that needs torch, imported
only when the checkpoint is written."""

from pathlib import Path

import torch
from safetensors.torch import save_file


def _qwen3_tensors(cfg: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    hidden, inter, head_dim = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q_size = cfg["num_attention_heads"] * head_dim
    kv_size = cfg["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.05

    tensors = {
        "model.embed_tokens.weight": normal(cfg["vocab_size"], hidden),
        "model.norm.weight": torch.ones(hidden),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": normal(q_size, hidden),
            p + "self_attn.k_proj.weight": normal(kv_size, hidden),
            p + "self_attn.v_proj.weight": normal(kv_size, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, q_size),
            p + "self_attn.q_norm.weight": torch.ones(head_dim),
            p + "self_attn.k_norm.weight": torch.ones(head_dim),
            p + "mlp.gate_proj.weight": normal(inter, hidden),
            p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        }
    return tensors


def write_demo_weights(cfg: dict, out_dir: Path) -> None:
    """Writes model.safetensors for the Qwen3 config `cfg`, the same on every machine."""
    save_file(
        _qwen3_tensors(cfg, torch.Generator().manual_seed(0)),
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
