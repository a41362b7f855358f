"""The engine's settings, fixed at start-up: what it serves, and how its process serves it.

Every `llmserve-engine` flag is a field here (`common.config_flags` derives the flags, the
checks and docs/configuration.md); torch-free, so the gRPC frontend can hold it.
"""

from dataclasses import dataclass, replace
from pathlib import Path

from llmserve.common.config_flags import (
    INT32_MAX,
    PORT_MAX,
    check,
    host_setting,
    log_format_setting,
    log_level_setting,
    setting,
)
from llmserve.common.request_limits import MAX_SPECULATIVE_TOKENS

DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9401
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
SPECULATIVE_METHODS = ("none", "ngram", "draft")
# --speculative-disable-batch-size's defaults: past these W8 stopped paying on an H100.
SPECULATION_BATCH_LIMITS = {"ngram": 32, "draft": 2}
# --num-speculative-tokens is bounded by MAX_SPECULATIVE_TOKENS (imported above), the bound of a
# request's speculative_tokens too: one value for the flag and both tiers' request checks.
# Triton's paged kernels index a block's rows with power-of-two masks.
BLOCK_SIZES = tuple(2**i for i in range(11))
SERVER = "server process"


@dataclass(frozen=True)
class EngineConfig:
    """What the engine is asked to serve, the limits it serves under, and its server process.

    A limit left None is chosen at start-up (from the checkpoint, the device or the KV pool):
    the engine builder fills those in once, and the parts it builds read that resolved copy.
    """

    model: Path = setting(Path("demo"),
                          "checkpoint directory, or 'demo' for the embedded demo model")
    dtype: str = setting("auto", "weights' and activations' dtype (auto: bfloat16 on a GPU, "
                                 "float16 for a float16 checkpoint, float32 on the CPU)",
                         choices=("auto", "float32", "bfloat16", "float16"))
    quantization: str = setting(
        "none", "quantize an unquantized checkpoint's linear layers as they load (fp8: e4m3 "
                "weights with per-output-channel scales, activations quantized per token; on a "
                "GPU, compute capability 8.9+). A quantized checkpoint (compressed-tensors "
                "or Hugging Face FP8) is served as it is either way", choices=("none", "fp8"))
    device: str = setting("auto", "auto: cuda when a GPU is visible, else cpu",
                          choices=("auto", "cpu", "cuda"))
    max_model_len: int | None = setting(
        None, "longest sequence, prompt plus output, in tokens (default: the checkpoint's; "
              "never more than it, nor than the KV pool holds)", low=2, high=INT32_MAX)
    max_num_seqs: int = setting(64, "sequences in one step", low=1, high=INT32_MAX)
    max_num_batched_tokens: int = setting(
        2048, "tokens computed in one step (longer prompts are chunked)", low=1, high=INT32_MAX)
    block_size: int = setting(16, "tokens per KV block; prefix-cache hashes cover whole blocks",
                              choices=BLOCK_SIZES)
    num_kv_blocks: int | None = setting(
        None, "KV blocks in the pool (default: what fits in --gpu-memory-utilization on a GPU, "
              "in --kv-cache-memory-gb on the CPU)", low=1, high=INT32_MAX)
    kv_cache_memory_gb: float = setting(
        1.0, "GiB the KV pool takes on the CPU (on a GPU, --gpu-memory-utilization sizes it)",
        low=0, exclusive_low=True, high=4096)
    kv_cache_dtype: str = setting(
        "auto", "KV cache storage (auto: the weights' dtype; fp8_e4m3: e4m3 with a scale per "
                "token and KV head, about twice the tokens per GiB; not with flash_attn)",
        choices=KV_CACHE_DTYPES)
    max_tokens_default: int = setting(256, "output tokens of a request that sets no max_tokens",
                                      low=1, high=INT32_MAX)
    prefix_caching: bool = setting(
        True, "reuse the KV blocks of prompt prefixes computed before (off: every request "
              "computes its whole prompt; the samples of an n > 1 request still share theirs)")
    block_hash_seed: int = setting(0, "seed of the prefix-cache block hashes (GetInfo reports "
                                      "it to routers)", low=0, high=2**64 - 1, flag=False)
    attention_backend: str = setting(
        "auto", "auto: triton on CUDA, torch on the CPU; flash_attn: flash-attn 4",
        choices=ATTENTION_BACKENDS)
    prefill_backend: str | None = setting(
        None, "overrides --attention-backend for prefill and mixed steps",
        choices=ATTENTION_BACKENDS)
    decode_backend: str | None = setting(
        None, "overrides --attention-backend for pure-decode steps", choices=ATTENTION_BACKENDS)
    gpu_memory_utilization: float = setting(
        0.9, "fraction of the GPU's memory this engine may hold: weights, activations and the "
             "KV cache", low=0, exclusive_low=True, high=1)
    enforce_eager: bool = setting(False, "no CUDA graphs at all")
    cuda_graph_max_bs: int = setting(
        256, "largest decode batch captured in a CUDA graph (capped at --max-num-seqs)",
        low=0, high=INT32_MAX)
    cuda_graph_max_tokens: int = setting(
        2048, "largest prefill or mixed step, in tokens, captured in a CUDA graph (capped at "
              "--max-num-batched-tokens; 0 = none)", low=0, high=INT32_MAX)
    tensor_parallel_size: int = setting(
        1, "ranks (GPUs, or CPU processes) the model is split over, one process each; must "
           "divide its KV heads", low=1, high=64, aliases=("-tp",))
    distributed: bool = setting(
        False, "run through torch.distributed and the rank step channel even at tensor "
               "parallel size 1 (benchmarks measure that path)", flag=False)
    async_scheduling: bool | None = setting(
        None, "read each step's tokens while the next step runs (default: on CUDA only; on the "
              "CPU a step is synchronous, so it would only delay every token by a step)")
    structured_output_compile_timeout_s: float = setting(
        10.0, "a request's structured output constraint still compiling after this long fails "
              "with DEADLINE_EXCEEDED (compiling never holds up the step loop)",
        low=0, exclusive_low=True, high=3600)
    structured_output_backend: str = setting(
        "auto", "library that masks structured output: auto (llguidance checks every "
                "constraint; xgrammar, whose masks are faster, serves the JSON schemas, JSON "
                "objects, regexes and choices it enforces in full; llguidance the rest), "
                "llguidance, or xgrammar (for all but Lark grammars, which are llguidance's; "
                "refuses schema keywords it does not enforce)",
        choices=("auto", "llguidance", "xgrammar"))

    speculative_method: str = setting(
        "none", "speculative decoding: ngram (prompt lookup over the request's own tokens) or "
                "draft (a small model of the same vocabulary, --speculative-draft-model); the "
                "output is the same as without it", choices=SPECULATIVE_METHODS)
    num_speculative_tokens: int = setting(
        4, "tokens proposed per sequence and step when speculating (a request may ask for "
           "fewer)", low=1, high=MAX_SPECULATIVE_TOKENS)
    speculative_draft_model: Path | None = setting(
        None, "checkpoint directory of the draft model (--speculative-method draft); it must "
              "have the served model's vocabulary")
    ngram_prompt_lookup_min: int = setting(
        2, "shortest suffix n-gram the ngram proposer looks up", low=1, high=64)
    ngram_prompt_lookup_max: int = setting(
        4, "longest suffix n-gram the ngram proposer looks up (it tries the longest first)",
        low=1, high=64)
    speculative_disable_batch_size: int | None = setting(
        None, "no speculation in a step with more running sequences than this (default: 32 "
              "with ngram, 2 with draft: where each stopped paying on W8, docs/benchmarks.md; "
              "a large batch is compute-bound, and verifying rejected guesses costs more than "
              "they save)", low=0, high=INT32_MAX)

    host: str = host_setting(group=SERVER)
    port: int | None = setting(
        None, f"gRPC port (default: {DEFAULT_PORT}, or the next free one; 0 = any)",
        low=0, high=PORT_MAX, group=SERVER)
    metrics_port: int | None = setting(
        None, f"/metrics port (default: {DEFAULT_METRICS_PORT}, or the next free one; -1 = off)",
        low=-1, high=PORT_MAX, group=SERVER)
    health_port: int = setting(
        -1, "also serve gRPC health alone, plaintext, on this port (for probes; -1 = off)",
        low=-1, high=PORT_MAX, group=SERVER)
    kv_events: bool = setting(
        True, "publish prefix-cache changes on WatchKvEvents (routers without them fall back to "
              "their own routing history)", group=SERVER)
    tls_cert: Path | None = setting(None, "server certificate (PEM); none = plaintext",
                                    group=SERVER)
    tls_key: Path | None = setting(None, "private key of --tls-cert", group=SERVER)
    tls_client_ca: Path | None = setting(
        None, "demand client certificates signed by this CA (mutual TLS)", group=SERVER)
    drain_timeout_s: float = setting(
        30.0, "on SIGTERM, how long requests in flight may take to finish", low=0, high=3600,
        group=SERVER)
    log_format: str = log_format_setting(group=SERVER)
    log_level: str = log_level_setting(group=SERVER)

    def __post_init__(self) -> None:
        check(self)
        backends = (self.attention_backend, self.prefill_backend, self.decode_backend)
        if self.kv_cache_dtype == "fp8_e4m3" and "flash_attn" in backends:
            # flash-attn 4 reads bf16/fp16 pages only, without per-row scales.
            raise ValueError(
                "--kv-cache-dtype fp8_e4m3 cannot run with --attention-backend flash_attn "
                "(nor --prefill-backend/--decode-backend flash_attn): flash-attn 4 reads only a "
                "bfloat16/float16 KV cache; choose --attention-backend triton or keep "
                "--kv-cache-dtype auto")
        if (self.speculative_method == "draft") != (self.speculative_draft_model is not None):
            raise ValueError("--speculative-draft-model is needed by --speculative-method draft, "
                             "and only by it")
        if self.ngram_prompt_lookup_min > self.ngram_prompt_lookup_max:
            raise ValueError("--ngram-prompt-lookup-min must not exceed "
                             "--ngram-prompt-lookup-max")

    @property
    def speculation_batch_limit(self) -> int:
        """The most running sequences a step speculates with."""
        if self.speculative_disable_batch_size is not None:
            return self.speculative_disable_batch_size
        return SPECULATION_BATCH_LIMITS.get(self.speculative_method, 0)

    @property
    def max_draft_tokens(self) -> int:
        """The most tokens a step proposes past one sequence's end (0: no speculation)."""
        return self.num_speculative_tokens if self.speculative_method != "none" else 0

    @property
    def kv_cache_memory_bytes(self) -> int:
        return int(self.kv_cache_memory_gb * (1 << 30))

    def resolved(self, max_position_embeddings: int) -> "EngineConfig":
        """This config with max_model_len resolved from the checkpoint's: its length unless
        asked for less. (Start-up caps it again once the KV pool is sized.)"""
        return replace(self, max_model_len=min(self.max_model_len or max_position_embeddings,
                                               max_position_embeddings))
