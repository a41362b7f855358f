"""Builds this rank's model runner from the engine config: device, dtype, attention backends,
weights. Rank 0 does it inside the engine core; every other tensor-parallel rank, alone in its
process (`follower.py`)."""

import os

import structlog
import torch

from llmserve.engine_service.attention.backends import load_backend, phase_backends
from llmserve.engine_service.attention.kv_cache import check_kv_cache_dtype
from llmserve.engine_service.attention.layer import AttentionKernels, BackendUnavailableError
from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.models.checkpoint import read_model_spec
from llmserve.engine_service.parallel.group import TensorParallelGroup
from llmserve.engine_service.runner.model_runner import ModelRunner, resolve_dtype

log = structlog.get_logger(__name__)


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """The device a rank runs on: GPU `rank` under tensor parallelism, else as configured."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and distributed(config):
        device = torch.device("cuda", rank)
    return device


def distributed(config: EngineConfig) -> bool:
    """Whether ranks run through torch.distributed (always at TP > 1; at TP = 1 if asked)."""
    return config.tensor_parallel_size > 1 or config.distributed


def set_cpu_threads(config: EngineConfig) -> None:
    """On the CPU the ranks would take every core; leave one to the gRPC frontend."""
    cores = os.cpu_count() or 1
    if rank_device(config, 0).type == "cpu" and cores > 1:
        torch.set_num_threads(max(1, (cores - 1) // config.tensor_parallel_size))


def load_backends(config: EngineConfig, device: torch.device,
                  dtype: torch.dtype) -> tuple[AttentionKernels, AttentionKernels]:
    """The (prefill, decode) backends the config names, refusing a decode backend that CUDA
    graphs cannot run where they would be captured, and a KV cache dtype the device lacks."""
    check_kv_cache_dtype(config.kv_cache_dtype, device)
    prefill_name, decode_name = phase_backends(
        config.attention_backend, config.prefill_backend, config.decode_backend, device
    )
    prefill = load_backend(prefill_name, device, dtype)
    decode = prefill if decode_name == prefill_name else load_backend(decode_name, device, dtype)
    if device.type == "cuda" and not config.enforce_eager and not decode.graph_safe:
        raise BackendUnavailableError(
            f"attention backend {decode.name!r} cannot run inside CUDA graphs (it reads device "
            "tensors on the host): add --enforce-eager or choose another backend"
        )
    return prefill, decode


def build_runner(config: EngineConfig, tp: TensorParallelGroup,
                 backends: tuple[AttentionKernels, AttentionKernels] | None = None
                 ) -> ModelRunner:
    """Loads this rank's shard of the weights (every rank runs this the same way); `backends`
    are the attention backends when the caller already loaded them."""
    spec = read_model_spec(config.model)
    device = rank_device(config, tp.rank)
    dtype = resolve_dtype(config.dtype, spec, device)
    prefill, decode = backends or load_backends(config, device, dtype)
    log.info(
        "loading_weights",
        model=str(config.model),
        architecture=spec.architecture,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        prefill_backend=prefill.name,
        decode_backend=decode.name,
        tensor_parallel_rank=tp.rank,
        tensor_parallel_size=tp.size,
    )
    return ModelRunner(config.resolved(spec.max_position_embeddings), spec, device, dtype,
                       prefill, decode, tp)
