"""Start-up: read the checkpoint, choose device, dtype and attention backend, load the weights,
size the KV cache, warm up (capture the decode graphs); under tensor parallelism, start the
other ranks first."""

import json
import time
from dataclasses import replace
from pathlib import Path

import structlog
import torch

from llmserve.common.ports import ephemeral_port
from llmserve.common.startup_heap import freeze_startup_heap
from llmserve.engine_service.attention.layer import AttentionKernels
from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.block_pool import BlockPool
from llmserve.engine_service.core.draft_proposer import DraftProposer
from llmserve.engine_service.core.engine_core import EngineCore
from llmserve.engine_service.core.kv_sizing import (
    dummy_chunks,
    num_kv_blocks,
    profile_peak_bytes,
    snapshot,
)
from llmserve.engine_service.core.ngram_proposer import NgramProposer
from llmserve.engine_service.core.scheduler import ScheduledChunk, Scheduler
from llmserve.engine_service.models.checkpoint import ModelSpec, read_model_spec
from llmserve.engine_service.parallel.group import TensorParallelGroup, join_group
from llmserve.engine_service.parallel.rank_processes import RankProcesses
from llmserve.engine_service.runner.cuda_graphs import (
    CudaGraphCapture,
    eager_capture,
    graph_batch_sizes,
    varlen_graph_sizes,
)
from llmserve.engine_service.runner.model_runner import ModelRunner, resolve_dtype
from llmserve.engine_service.runner.runner_builder import (
    build_runner,
    distributed,
    load_backends,
    rank_device,
)
from llmserve.engine_service.seam import EngineInfo

log = structlog.get_logger(__name__)


def check_tensor_parallel(spec: ModelSpec, config: EngineConfig) -> None:
    """Refuses a group size the model cannot be split by, saying which sizes it can."""
    size = config.tensor_parallel_size
    divides = [n for n in range(1, spec.num_kv_heads + 1)
               if spec.num_kv_heads % n == 0 and spec.num_heads % n == 0
               and spec.intermediate_size % n == 0]
    if size not in divides:
        raise ValueError(
            f"tensor_parallel_size {size} does not divide this model's {spec.num_kv_heads} KV "
            f"heads ({spec.num_heads} query heads, MLP size {spec.intermediate_size}): the KV "
            f"cache is split by KV heads; supported sizes: {divides}")
    if distributed(config) and rank_device(config, 0).type == "cuda":
        available = torch.cuda.device_count()
        if size > available:
            raise ValueError(f"tensor_parallel_size {size} needs {size} GPUs; "
                             f"{available} visible")


def build_engine(config: EngineConfig) -> tuple[EngineCore, EngineInfo]:
    """Loads the checkpoint and returns a ready engine core with its description.

    Under tensor parallelism this process is rank 0: it starts the other ranks, which load
    their shards and follow its runner.
    """
    started = time.monotonic()
    spec = read_model_spec(config.model)
    check_tensor_parallel(spec, config)
    device = rank_device(config, 0)
    dtype = resolve_dtype(config.dtype, spec, device)
    on_cuda = device.type == "cuda"
    use_graphs = on_cuda and not config.enforce_eager
    # Backends are checked before any weights load: a missing one fails start-up at once.
    backends = load_backends(config, device, dtype)
    free_at_start = torch.cuda.mem_get_info(device)[0] if on_cuda else 0
    ranks = RankProcesses(config) if config.tensor_parallel_size > 1 else None
    tp = TensorParallelGroup()
    if distributed(config):
        port = ranks.port if ranks is not None else ephemeral_port()
        tp = join_group(0, config.tensor_parallel_size, port, device)
    runner = build_runner(config, tp, backends)
    runner.rank_processes = ranks
    block_bytes = ModelRunner.kv_bytes_per_block(spec, dtype, config.block_size, tp.size,
                                                 config.kv_cache_dtype)
    draft = None
    if config.speculative_draft_model is not None:
        # Loaded before the KV cache is sized: its weights and its KV share the budget.
        draft = build_draft_runner(config, runner, backends)
        block_bytes += ModelRunner.kv_bytes_per_block(draft.spec, draft.dtype,
                                                      config.block_size, 1,
                                                      config.kv_cache_dtype)
    num_blocks = config.num_kv_blocks
    if num_blocks is None and on_cuda:
        peak = profile_peak_bytes(runner)
        memory = snapshot(device, peak, free_at_start)
        num_blocks = num_kv_blocks(memory, config.gpu_memory_utilization, block_bytes)
    elif num_blocks is None:
        num_blocks = max(1, config.kv_cache_memory_bytes // block_bytes)
    # The runner's config has the checkpoint's max_model_len; from here on, the one that fits:
    # one sequence of max_model_len must always fit, or it could never be scheduled.
    assert runner.config.max_model_len is not None
    max_model_len = min(runner.config.max_model_len, num_blocks * config.block_size)
    if draft is not None:
        assert draft.config.max_model_len is not None
        max_model_len = min(max_model_len, draft.config.max_model_len)
    config = replace(
        runner.config,
        max_model_len=max_model_len,
        num_kv_blocks=num_blocks,
        async_scheduling=on_cuda if config.async_scheduling is None else config.async_scheduling,
    )
    runner.allocate_kv_cache(num_blocks)
    log.info(
        "kv_cache_ready",
        num_blocks=num_blocks,
        block_size=config.block_size,
        bytes=num_blocks * block_bytes,
        kv_cache_dtype=config.kv_cache_dtype,
        max_model_len=config.max_model_len,
        seconds=round(time.monotonic() - started, 2),
    )
    _warm_up(runner, config, use_graphs)
    pool = BlockPool(num_blocks)
    proposer: NgramProposer | DraftProposer | None = None
    if config.speculative_method == "ngram":
        proposer = NgramProposer(config.ngram_prompt_lookup_min, config.ngram_prompt_lookup_max)
    elif draft is not None:
        draft.allocate_kv_cache(num_blocks)
        # Drafts are proposed only in batches up to the speculation's limit; a catch-up takes
        # up to two rows a sequence (the last guess and the target's next token).
        limit = min(config.max_num_seqs, max(1, config.speculation_batch_limit))
        _warm_up(draft, replace(config, max_num_seqs=min(config.max_num_seqs, 2 * limit)),
                 use_graphs)
        draft.capture_greedy_loop(config.num_speculative_tokens - 1, graph_batch_sizes(limit),
                                  CudaGraphCapture() if use_graphs else eager_capture)
        cost = 0.0
        # Under tensor parallelism the target's pass is collective: not timed from rank 0.
        if use_graphs and tp.size == 1:
            context = min(1024, config.max_model_len // 2)
            cost = _decode_seconds(draft, context) / _step_seconds(runner, context)
            log.info("speculation_guess_cost", guess_cost=round(cost, 4))
        proposer = DraftProposer(draft, cost)
    core = EngineCore(config, runner, Scheduler(config, pool), pool, spec.eos_token_ids,
                      proposer)
    info = EngineInfo.describe(
        config,
        architecture=spec.architecture,
        vocab_size=spec.vocab_size,
        eos_token_ids=spec.eos_token_ids,
        attention_backend=runner.attention.name,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
    )
    log.info("engine_built", attention_backend=info.attention_backend,
             cuda_graphs=runner.graphs is not None,
             varlen_graphs=runner.varlen_graphs is not None,
             async_scheduling=config.async_scheduling,
             seconds=round(time.monotonic() - started, 2))
    freeze_startup_heap()
    return core, info


def build_draft_runner(config: EngineConfig, target: ModelRunner,
                       backends: tuple[AttentionKernels, AttentionKernels]) -> ModelRunner:
    """The draft model's runner, on rank 0 alone, after checking that it speaks the target's
    vocabulary (its guesses are token ids of the target's)."""
    assert config.speculative_draft_model is not None
    path = config.speculative_draft_model
    draft_spec, spec = read_model_spec(path), target.spec
    target_vocab, draft_vocab = _vocabulary(config.model), _vocabulary(path)
    if draft_spec.vocab_size != spec.vocab_size or target_vocab != draft_vocab:
        raise ValueError(
            f"--speculative-draft-model {path}: its vocabulary ({draft_spec.vocab_size} ids, "
            f"tokenizer {'the same' if target_vocab == draft_vocab else 'different'}) is not "
            f"the served model's ({spec.vocab_size} ids); a draft must share the target's "
            "tokenizer")
    # The target's dtype, for which the attention backends were loaded.
    draft_config = replace(config, model=path, quantization="none", tensor_parallel_size=1,
                           distributed=False, max_model_len=None,
                           dtype=str(target.dtype).removeprefix("torch."))
    return build_runner(draft_config, TensorParallelGroup(), backends)


def _vocabulary(model: Path) -> dict | None:
    """The token -> id map of a checkpoint's tokenizer.json (with its added tokens), if any."""
    path = model / "tokenizer.json"
    if not path.is_file():
        return None
    tokenizer = json.loads(path.read_text())
    vocab = dict(tokenizer.get("model", {}).get("vocab", {}))
    vocab.update({t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])})
    return vocab


def _warm_up(runner: ModelRunner, config: EngineConfig, use_graphs: bool) -> None:
    """Captures the decode and varlen graphs, or on CUDA without them compiles every decode
    variant."""
    if runner.device.type != "cuda":
        return
    sizes = graph_batch_sizes(min(config.cuda_graph_max_bs, config.max_num_seqs))
    varlen = []
    if runner.attention.prefill.varlen_graph_safe:
        varlen = varlen_graph_sizes(min(config.cuda_graph_max_tokens,
                                        config.max_num_batched_tokens))
    if use_graphs and sizes:
        runner.capture_graphs(sizes, varlen, CudaGraphCapture())
    else:
        runner.warm_up_decode(sizes)


@torch.inference_mode()
def _decode_seconds(runner: ModelRunner, context: int, repeats: int = 20) -> float:
    """GPU seconds of a one-row decode pass with its logits and pick (its graph's replay),
    attending to `context` tokens (block 0's, over and over; it stores nothing)."""
    assert runner.graphs is not None
    meta = runner.inputs.padding_batch(1, 1, decode=True).attention
    meta.seq_lens[:1] = context
    meta.block_tables[:1] = 0

    def once() -> torch.Tensor:
        return runner.model.compute_logits(runner.graphs.replay(1)[:1]).argmax(dim=-1)

    once()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        once()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


@torch.inference_mode()
def _step_seconds(runner: ModelRunner, context: int, repeats: int = 10) -> float:
    """Wall seconds of a one-sequence decode step at `context` tokens, its inputs built and its
    pick read: what a verifying step costs beside its guesses. It writes one slot of block 0,
    which no sequence holds yet."""
    seq = dummy_chunks(context, 1, runner.block_size)[0].seq
    chunk = ScheduledChunk(seq, context - 1, 1)
    runner.execute([chunk])[0].argmax(dim=-1).tolist()
    started = time.perf_counter()
    for _ in range(repeats):
        runner.execute([chunk])[0].argmax(dim=-1).tolist()
    return (time.perf_counter() - started) / repeats
