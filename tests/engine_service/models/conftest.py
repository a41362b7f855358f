"""FP8 checkpoints made by the real tool (llm-compressor) from the tests' tiny Qwen3, and
teacher-forced logits through the engine's own scheduler and runner."""

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.engine_builder import build_engine

# The tiny checkpoint's weights (std 0.2) times this: as if drawn with std 0.5. Its logits then
# spread over ~4 (not ~1.6) and the top token takes about half the softmax mass, so greedy
# top-1 is a real choice rather than a coin toss between near-equal logits.
PEAK = 2.5


def _peaked(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every matrix (not the norms) scaled by PEAK."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.mul_(PEAK)
    return model


def _llmcompressor_fp8(src: Path, out: Path, scheme: str) -> Path:
    """`src` quantized by llm-compressor's `oneshot` with `scheme` on every linear layer but the
    LM head (data-free), saved compressed."""
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme,
                                                     ignore=["lm_head"]))
    return _copy_checkpoint(model, src, out, save_compressed=True)


def _copy_checkpoint(model: torch.nn.Module, src: Path, out: Path, **save: object) -> Path:
    """Saves `model` into `out` with the tokenizer files of `src`."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    model.save_pretrained(out, **save)
    return out


@pytest.fixture(scope="session")
def peaked_qwen3(tiny_checkpoint: Callable[[str], Path],
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3 with every matrix (not the norms) scaled by PEAK, in fp32."""
    import transformers

    src = tiny_checkpoint("qwen3")
    model = _peaked(transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32))
    return _copy_checkpoint(model, src, tmp_path_factory.mktemp("qwen3-peaked") / "model")


@pytest.fixture(scope="session")
def fp8_dynamic_qwen3(peaked_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`peaked_qwen3` quantized by llm-compressor's `oneshot` with the FP8_DYNAMIC scheme on
    every linear layer but the LM head (data-free: weights per channel now, activations per
    token at run time), saved compressed: the format published FP8 checkpoints use."""
    return _llmcompressor_fp8(peaked_qwen3, tmp_path_factory.mktemp("qwen3-fp8-dynamic") / "model",
                              "FP8_DYNAMIC")


@pytest.fixture(scope="session")
def fp8_block_qwen3(peaked_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`peaked_qwen3` quantized by llm-compressor's FP8_BLOCK scheme (a scale per 128x128 block
    of each weight, activations in dynamic groups of 128), data-free, saved compressed."""
    return _llmcompressor_fp8(peaked_qwen3, tmp_path_factory.mktemp("qwen3-fp8-block") / "model",
                              "FP8_BLOCK")


@pytest.fixture(scope="session")
def peaked_qwen3_128(peaked_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 like `peaked_qwen3` (same vocabulary, two layers, weights as if of std 0.5)
    but 128 wide (MLP 256, 4 query and 2 KV heads of 64): transformers quantizes to its own
    `fp8` format only the weights made of whole 128x128 blocks."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(peaked_qwen3)
    config.update({"hidden_size": 128, "intermediate_size": 256, "head_dim": 64})
    torch.manual_seed(1)
    model = _peaked(transformers.Qwen3ForCausalLM(config).float().eval())
    return _copy_checkpoint(model, peaked_qwen3, tmp_path_factory.mktemp("qwen3-128") / "model")


@pytest.fixture(scope="session")
def hf_fp8_qwen3(peaked_qwen3_128: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`peaked_qwen3_128` quantized by transformers itself to its block-wise `fp8` format
    (FineGrainedFP8Config: e4m3 weights, a `weight_scale_inv` per 128x128 block, dynamic
    activations), every linear layer but the LM head."""
    import transformers
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    with pytest.MonkeyPatch.context() as patch:
        # transformers refuses to quantize where no GPU is: an environment check only, its
        # quantizing op is plain torch and runs on the CPU.
        patch.setattr(FineGrainedFP8HfQuantizer, "validate_environment",
                      lambda self, *args, **kwargs: None)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            peaked_qwen3_128, dtype=torch.float32,
            quantization_config=transformers.FineGrainedFP8Config())
    out = tmp_path_factory.mktemp("qwen3-hf-fp8") / "model"
    return _copy_checkpoint(model, peaked_qwen3_128, out)


def _with_kv_scales(peaked_qwen3: Path, out: Path, **recipe: object) -> Path:
    """`peaked_qwen3` through llm-compressor's `oneshot` with `recipe` plus its FP8
    `kv_cache_scheme` (per-tensor K and V scales, `k_scale` and `v_scale`, calibrated on a few
    random sequences), saved compressed."""
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = transformers.AutoModelForCausalLM.from_pretrained(peaked_qwen3, dtype=torch.float32)
    ids = torch.randint(3, 600, (8, 32), generator=torch.Generator().manual_seed(0)).tolist()
    calibration = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 32] * 8})
    kv_scheme = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                 "symmetric": True}
    oneshot(model=model, dataset=calibration, num_calibration_samples=8, max_seq_length=32,
            recipe=QuantizationModifier(kv_cache_scheme=kv_scheme, **recipe))
    return _copy_checkpoint(model, peaked_qwen3, out, save_compressed=True)


@pytest.fixture(scope="session")
def fp8_kv_scheme_qwen3(peaked_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP8_DYNAMIC weights as above, and FP8 KV scales."""
    return _with_kv_scales(peaked_qwen3, tmp_path_factory.mktemp("qwen3-fp8-kv") / "model",
                           targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])


@pytest.fixture(scope="session")
def kv_scales_only_qwen3(peaked_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Float weights, and FP8 KV scales."""
    return _with_kv_scales(peaked_qwen3, tmp_path_factory.mktemp("qwen3-kv-only") / "model")


@pytest.fixture
def teacher_forced(teacher_forced: Callable[..., list[torch.Tensor]]
                   ) -> Callable[..., torch.Tensor]:
    """The shared teacher forcing (tests/conftest.py) on one sequence of a checkpoint: the
    engine's fp32 logits [len(sequence) - prompt_len + 1, vocab] after the prompt and after each
    later token of `sequence`, fed in instead of the sampled ones."""

    def logits(model_dir: Path, sequence: list[int], prompt_len: int,
               **settings: object) -> torch.Tensor:
        core, _ = build_engine(EngineConfig(model=model_dir, device="cpu", num_kv_blocks=64,
                                            **settings))
        # A last forced entry that is never fed: one more row, the logits after the last token.
        try:
            (rows,) = teacher_forced(core, [sequence[:prompt_len]],
                                     [[*sequence[prompt_len:], 0]])
        finally:
            core.runner.shutdown()  # under tensor parallelism the other ranks stop with it
        return rows

    return logits
