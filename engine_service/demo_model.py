"""The embedded demo model: a tiny Qwen3 checkpoint with random weights and a real BPE tokenizer.

Created deterministically on first use under a cache folder, so the system runs anywhere with no
download. Its weights are random: it produces gibberish, fluent only in the tokenizer's pieces.
"""

import json
import shutil
import tempfile
from pathlib import Path

import structlog
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmserve.common.demo_checkpoint import demo_model_dir

log = structlog.get_logger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, the format Qwen models use.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_CORPUS = [
    "A router tier tokenizes text, applies priority policy and balances load across engines.",
    "Each engine streams tokens from a paged key-value cache with continuous batching.",
    "Hello! How are you today? I am fine, thank you. The weather is sunny and warm.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps by the window.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
    "def generate(prompt: str, max_tokens: int = 16) -> str:\n    return model(prompt)\n",
    "Large language models predict the next token given all the tokens that came before.",
    "Prefix caching lets requests that share a long system prompt skip recomputing it.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828; dates like 2026-11-23.",
    "Unicode text: café, naïve, Zürich, 東京, Москва, 😀 — all encoded as UTF-8 bytes.",
]


def build_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """A byte-level BPE tokenizer trained on a fixed corpus (the same merges on every machine)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    return tokenizer


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path, max_len: int) -> None:
    """Writes tokenizer.json and a tokenizer_config.json that transformers and our router read."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def create_demo_model(out_dir: Path) -> None:
    """Writes the demo checkpoint (config, weights, tokenizer) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    im_end = tokenizer.token_to_id("<|im_end|>")
    endoftext = tokenizer.token_to_id("<|endoftext|>")
    cfg = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "torch_dtype": "float32",
        "eos_token_id": im_end,
        "pad_token_id": endoftext,
    }
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    (out_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [im_end, endoftext], "pad_token_id": endoftext}, indent=2)
    )
    # Imported only here: the engine's frontend imports this module and must not load torch.
    from llmserve.engine_service.demo_weights import write_demo_weights

    write_demo_weights(cfg, out_dir)
    write_tokenizer(tokenizer, out_dir, cfg["max_position_embeddings"])


def ensure_demo_model() -> Path:
    """Returns the demo checkpoint's directory, creating it on first use (atomically)."""
    target = demo_model_dir()
    if (target / "model.safetensors").is_file():
        return target
    log.info(
        "creating_demo_model",
        path=str(target),
        note="random weights: the demo model's output is gibberish",
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        create_demo_model(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main() -> None:
    """Console script: create the demo model if needed and print its directory."""
    print(ensure_demo_model())
