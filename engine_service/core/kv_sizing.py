"""How many KV blocks fit on the GPU: a profiling pass at the largest step, then the budget.

The profiling pass runs the largest step the scheduler can plan (max_num_batched_tokens tokens
over as many sequences as may run) and the sampler on the largest batch of logits, with every row
penalized and biased and the penalties' count table at its largest (one row per sequence that may
run; allocated only once a request asks, so until then it is spare room), against a one-block KV
pool (every token stores into and reads from that block: the values do not matter,
the memory does). Its peak is what the weights and activations need; the KV cache gets the rest
of `gpu_memory_utilization`.
"""

from dataclasses import dataclass

import structlog
import torch

from llmserve.common.request_limits import MAX_LOGIT_BIAS, MAX_LOGPROBS
from llmserve.engine_service.core.scheduler import ScheduledChunk
from llmserve.engine_service.core.sequence import Sequence
from llmserve.engine_service.runner.logits_processors import LogitsProcessing, TokenState
from llmserve.engine_service.runner.model_runner import ModelRunner
from llmserve.engine_service.runner.sampler import Sampler, SamplingBatch
from llmserve.engine_service.seam import EngineRequest, SamplingOptions

log = structlog.get_logger(__name__)
GIB = 1 << 30
SAFETY_BYTES = 256 << 20  # allocator fragmentation and small buffers made after sizing


@dataclass(frozen=True)
class MemorySnapshot:
    """The device's memory after profiling, with the engine's own use of it."""

    total: int  # the device's memory
    free: int  # free now (other processes' use is already subtracted)
    peak_allocated: int  # this process's peak during profiling: weights + activations
    allocated: int  # this process's tensors now (the weights)
    non_torch: int  # what this process took outside torch's allocator since start-up


def dummy_chunks(num_tokens: int, num_seqs: int, block_size: int) -> list[ScheduledChunk]:
    """`num_tokens` prompt tokens over `num_seqs` sequences, every page mapped to block 0."""
    num_seqs = max(1, min(num_seqs, num_tokens))
    chunks = []
    for i in range(num_seqs):
        length = num_tokens // num_seqs + (i < num_tokens % num_seqs)
        seq = Sequence(EngineRequest(f"profile-{i}", [0] * length), i, 0)
        seq.block_ids = [0] * -(-length // block_size)
        chunks.append(ScheduledChunk(seq, 0, length))
    return chunks


def profile_peak_bytes(runner: ModelRunner) -> int:
    """Peak bytes allocated by the weights plus the largest step and its sampling."""
    config, device = runner.config, runner.device
    runner.allocate_kv_cache(1)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    # Held through the step, as a running engine's would be.
    token_state = TokenState(runner.spec.vocab_size, device)
    token_state.reserve(config.max_num_seqs, MAX_LOGIT_BIAS)
    # The largest step the scheduler can plan: no sequence holds more than max_model_len.
    num_tokens = min(config.max_num_batched_tokens, config.max_num_seqs * config.max_model_len)
    chunks = dummy_chunks(num_tokens, config.max_num_seqs, config.block_size)
    logits, _ = runner.execute(chunks)
    rows = logits.shape[0]
    every_row = torch.arange(rows, device=device)

    def column(value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((rows,), value, dtype=dtype, device=device)

    # Temperature with top-p takes the sampler's most memory-hungry path (the full sort).
    options = SamplingOptions(temperature=0.6, top_p=0.9, logprobs=MAX_LOGPROBS)
    Sampler()(logits, SamplingBatch(
        temperature=column(options.temperature, torch.float32),
        top_p=column(options.top_p, torch.float32), top_k=column(0, torch.int64),
        min_p=column(0.0, torch.float32), seeds=column(0, torch.int64),
        positions=column(0, torch.int64), num_logprobs=[options.logprobs] * rows,
        processing=LogitsProcessing(token_state, None, every_row, every_row, True, True)))
    del logits, token_state
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    runner.allocate_kv_cache(0)
    log.info("profiled", tokens=num_tokens, sequences=len(chunks),
             peak_gib=round(peak / GIB, 3), weights_gib=round(runner.weight_bytes / GIB, 3))
    return peak


def kv_cache_bytes(memory: MemorySnapshot, utilization: float) -> int:
    """Bytes for the KV cache: what `utilization` of the device leaves after the engine's peak,
    and never more than is free while activations are at their peak."""
    budget = int(memory.total * utilization) - memory.peak_allocated - memory.non_torch
    still_free = memory.free - (memory.peak_allocated - memory.allocated) - SAFETY_BYTES
    return min(budget, still_free)


def snapshot(device: torch.device, peak: int, free_at_start: int) -> MemorySnapshot:
    """The device's memory now (call after profiling, with its cache emptied)."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    return MemorySnapshot(total=total, free=free, peak_allocated=peak,
                          allocated=torch.cuda.memory_allocated(device),
                          non_torch=max(0, free_at_start - free - reserved))


def num_kv_blocks(memory: MemorySnapshot, utilization: float, block_bytes: int) -> int:
    """Blocks that fit the budget; an error a person can act on when none does."""
    budget = kv_cache_bytes(memory, utilization)
    if budget < block_bytes:
        raise ValueError(
            f"gpu_memory_utilization {utilization} of {memory.total / GIB:.1f} GiB leaves no room "
            f"for the KV cache: the weights and the largest step peak at "
            f"{memory.peak_allocated / GIB:.2f} GiB, {memory.free / GIB:.1f} GiB is free; raise "
            "--gpu-memory-utilization or lower --max-num-batched-tokens / --max-num-seqs")
    return budget // block_bytes
