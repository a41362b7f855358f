"""Start-up: read the checkpoint, choose device and dtype, size the KV cache, load the weights."""

import time
from dataclasses import dataclass

import structlog
import torch

from llmserve.common.block_hash import ALGORITHM
from llmserve.engine_service.block_pool import BlockPool
from llmserve.engine_service.checkpoint import read_model_spec
from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.engine_core import EngineCore
from llmserve.engine_service.model_runner import ModelRunner, resolve_dtype
from llmserve.engine_service.scheduler import Scheduler, SchedulerConfig

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EngineInfo:
    """What `GetInfo` reports: the model and the limits it is served under."""

    model: str
    architecture: str
    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_hash_algorithm: str
    block_hash_seed: int
    eos_token_ids: tuple[int, ...]
    attention_backend: str
    dtype: str
    device: str
    max_tokens_default: int


def build_engine(config: EngineConfig) -> tuple[EngineCore, EngineInfo]:
    """Loads the checkpoint and returns a ready engine core with its description."""
    started = time.monotonic()
    spec = read_model_spec(config.model)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu")
        if config.device == "auto"
        else config.device
    )
    dtype = resolve_dtype(config.dtype, spec, device)
    max_model_len = min(
        config.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings
    )
    block_bytes = ModelRunner.kv_bytes_per_block(spec, dtype, config.block_size)
    num_blocks = config.num_kv_blocks or max(1, config.kv_cache_memory_bytes // block_bytes)
    # One sequence of max_model_len must always fit, or it could never be scheduled.
    max_model_len = min(max_model_len, num_blocks * config.block_size)
    log.info(
        "loading_weights",
        model=str(config.model),
        architecture=spec.architecture,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )
    runner = ModelRunner(config.model, spec, device, dtype, num_blocks, config.block_size)
    log.info(
        "kv_cache_ready",
        num_blocks=num_blocks,
        block_size=config.block_size,
        bytes=num_blocks * block_bytes,
        max_model_len=max_model_len,
        seconds=round(time.monotonic() - started, 2),
    )
    pool = BlockPool(num_blocks)
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            block_size=config.block_size,
            max_model_len=max_model_len,
            block_hash_seed=config.block_hash_seed,
        ),
        pool,
    )
    core = EngineCore(runner, scheduler, pool, spec.eos_token_ids, max_model_len)
    info = EngineInfo(
        model=config.model.name,
        architecture=spec.architecture,
        vocab_size=spec.vocab_size,
        max_model_len=max_model_len,
        block_size=config.block_size,
        num_blocks=num_blocks,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        block_hash_algorithm=ALGORITHM,
        block_hash_seed=config.block_hash_seed,
        eos_token_ids=spec.eos_token_ids,
        attention_backend=runner.backend.name,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        max_tokens_default=config.max_tokens_default,
    )
    return core, info
