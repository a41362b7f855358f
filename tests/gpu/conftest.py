"""Helpers for the CUDA engine tests (as fixtures: with --import-mode=importlib test modules
cannot import one another). The tiny checkpoints, `make_core`, `greedy`, `teacher_forced` and
`prompts` come from tests/conftest.py, which the CPU tests of the graph path share.
"""

from pathlib import Path

import pytest
import torch

from llmserve.engine_service.demo_model import build_tokenizer, write_tokenizer


@pytest.fixture(scope="session")
def qwen3_hd128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3 with Qwen3-0.6B's head shape (head_dim 128, 2 query heads per KV
    head), saved by transformers itself, as tests/conftest.py's tiny checkpoints are."""
    import transformers

    out_dir = tmp_path_factory.mktemp("qwen3-hd128")
    tokenizer = build_tokenizer()
    config = transformers.Qwen3Config(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=256, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
        max_position_embeddings=512, rope_theta=1000000.0, initializer_range=0.05,
        tie_word_embeddings=True, eos_token_id=tokenizer.token_to_id("<|im_end|>"),
        bos_token_id=None, pad_token_id=tokenizer.token_to_id("<|endoftext|>"))
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).eval().save_pretrained(out_dir)
    write_tokenizer(tokenizer, out_dir, 512)
    return out_dir
