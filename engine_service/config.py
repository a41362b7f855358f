"""Engine settings, fixed at start-up."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    """What the engine is asked to serve and the limits it serves under."""

    model: Path
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None
    # The KV pool's size on the CPU; on a GPU the pool is sized by gpu_memory_utilization.
    kv_cache_memory_bytes: int = 1 << 30
    max_tokens_default: int = 256
    block_hash_seed: int = 0
    # auto = triton on CUDA, torch on the CPU; prefill_/decode_backend override one phase each.
    attention_backend: str = "auto"
    prefill_backend: str | None = None
    decode_backend: str | None = None
    # Fraction of the GPU's memory this engine may hold: weights, activations and the KV cache.
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    cuda_graph_max_bs: int = 256
    # Prefill and mixed steps of up to this many tokens replay graphs too (0: never).
    cuda_graph_max_tokens: int = 2048
    # One process per rank; the KV cache is split by KV heads, so this must divide them.
    tensor_parallel_size: int = 1
    # Run through torch.distributed and the step channel even at tensor_parallel_size 1.
    distributed: bool = False
    # Read each step's tokens while the next step runs (None = on CUDA only: on the CPU the
    # step is synchronous, so overlapping would only delay every token by one step).
    async_scheduling: bool | None = None
