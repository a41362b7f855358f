"""Reads a Hugging Face checkpoint directory: config.json, generation_config.json, *.safetensors."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from llmserve.engine_service.parallel.layers import TensorSource

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")


class CheckpointError(ValueError):
    """The directory is not a checkpoint this engine can serve; the message says why."""


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only model, as read from config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    torch_dtype: str


def _eos_ids(*values: object) -> tuple[int, ...]:
    ids: list[int] = []
    for value in values:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and item not in ids:
                ids.append(item)
    return tuple(ids)


def _rope_scaling(params: dict) -> dict | None:
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise CheckpointError(
            f"rope type {rope_type!r} is not supported; supported: default, llama3"
        )
    return params


def read_model_spec(model_dir: Path) -> ModelSpec:
    """Parses config.json (and generation_config.json for end-of-sequence ids)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json: not a Hugging Face checkpoint")
    cfg = json.loads(config_path.read_text())
    architecture = (cfg.get("architectures") or ["?"])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"architecture {architecture!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}"
        )
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    rope_params = cfg.get("rope_parameters") or {}
    num_heads = cfg["num_attention_heads"]
    return ModelSpec(
        architecture=architecture,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta") or rope_params.get("rope_theta", 10000.0),
        rope_scaling=_rope_scaling(cfg.get("rope_scaling") or rope_params),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        # Qwen2 always has q/k/v biases; Llama and Qwen3 say so in attention_bias.
        attention_bias=architecture == "Qwen2ForCausalLM" or cfg.get("attention_bias", False),
        qk_norm=architecture == "Qwen3ForCausalLM",
        eos_token_ids=_eos_ids(gen.get("eos_token_id"), cfg.get("eos_token_id")),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
    )


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, TensorSource]]:
    """Yields every (name, tensor) stored in the directory's *.safetensors files, each as a
    lazy slice: a tensor-parallel rank reads only its own rows or columns."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} has no *.safetensors weights")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                yield name, f.get_slice(name)
