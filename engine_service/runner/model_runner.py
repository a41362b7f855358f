"""Runs the model over one scheduled step: the flat batch, the paged KV cache, the logits.

On CUDA the weights are bf16 by default, the non-matmul operations are Triton kernels, and
decode steps and short prefill/mixed steps replay CUDA graphs; on the CPU everything runs the
torch twins. Under tensor parallelism every rank has a runner holding its shard: rank 0's
publishes each call to the others through a `StepChannel`, and the others `follow()` it.
"""

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import structlog
import torch

from llmserve.engine_service.attention import kv_cache
from llmserve.engine_service.attention.layer import (
    AttentionKernels,
    AttentionMetadata,
    PagedAttention,
)
from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.models.checkpoint import ModelSpec, iter_safetensors
from llmserve.engine_service.models.decoder import DecoderModel
from llmserve.engine_service.models.quantization import (
    check_fp8_device,
    read_weight_quantization,
)
from llmserve.engine_service.parallel.group import TensorParallelGroup
from llmserve.engine_service.parallel.rank_processes import RankProcesses
from llmserve.engine_service.runner.chunk import Chunk, ChunkSequence
from llmserve.engine_service.runner.cuda_graphs import (
    CudaGraphCapture,
    GraphCapture,
    StepGraphs,
    eager_capture,
)
from llmserve.engine_service.runner.greedy_loop import GreedyDecodeLoop
from llmserve.engine_service.runner.prompt_logprobs import PromptScores, PromptScoring, score_prompt
from llmserve.engine_service.runner.step_channel import Op, StepChannel, step_args, step_layout
from llmserve.engine_service.runner.step_inputs import StepBatch, StepInputs, upload
from llmserve.kernels.ops import kernel_ops

log = structlog.get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(requested: str, spec: ModelSpec, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on a GPU (fp16 if the checkpoint is fp16), fp32 on the CPU (bf16 matmuls
    are slow there)."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if spec.torch_dtype == "float16" else torch.bfloat16


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Creates parameters in `dtype` (no fp32 copy of the weights is ever made)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@dataclass(frozen=True)
class PendingTokens:
    """Input tokens still on the device: the token of chunk `rows[i]` (its only one) is
    `tokens[sources[i]]`."""

    tokens: torch.Tensor
    rows: list[int]
    sources: list[int]


@dataclass(frozen=True)
class DeviceDrafts:
    """Draft tokens still on the device: the last lengths[i] input tokens of chunk rows[i] are
    tokens[i, :lengths[i]]."""

    tokens: torch.Tensor  # [len(rows), max(lengths)]
    rows: list[int]
    lengths: list[int]


class ModelRunner:
    """Owns the weights, the KV cache and the decode graphs on one device; computes logits."""

    def __init__(self, config: EngineConfig, spec: ModelSpec, device: torch.device,
                 dtype: torch.dtype, prefill: AttentionKernels, decode: AttentionKernels,
                 tp: TensorParallelGroup | None = None) -> None:
        """`config` has its max_model_len resolved: it sizes the buffers, with the step
        limits."""
        assert config.max_model_len is not None
        self.spec, self.device, self.dtype, self.config = spec, device, dtype, config
        self.tp = tp or TensorParallelGroup()
        self.block_size = config.block_size
        self.num_kv_heads = spec.num_kv_heads // self.tp.size
        self.ops = kernel_ops(device)
        quant = read_weight_quantization(config.model, config.quantization)
        if quant.kv_scales and self.tp.leader:
            log.info("checkpoint_kv_scales_unused", kv_cache_dtype=config.kv_cache_dtype,
                     reason="an e4m3 cache scales each row by its own largest value")
        check_fp8_device(quant, device, dtype)
        with torch.device(device), default_dtype(dtype):
            self.model = DecoderModel(spec, self.ops, self.tp, quant)
        self.model.load_weights(iter_safetensors(config.model))
        self.model.eval()
        self.attention = PagedAttention(prefill, decode, self.ops.qkv_rope_store,
                                        1.0 / math.sqrt(spec.head_dim))
        max_pages = -(-config.max_model_len // config.block_size)
        self.inputs = StepInputs(max(config.max_num_batched_tokens, config.max_num_seqs),
                                 config.max_num_seqs, max_pages, config.block_size, device,
                                 1 + config.max_draft_tokens)
        self.channel = StepChannel(self.tp, self.inputs)
        # Rank 0 owns the other ranks' processes (set by the engine builder).
        self.rank_processes: RankProcesses | None = None
        self.greedy_loop: GreedyDecodeLoop | None = None  # a draft model's (see draft_proposer)
        self.graphs: StepGraphs | None = None  # decode steps, by batch size
        self.varlen_graphs: StepGraphs | None = None  # other steps, by token count
        self.num_blocks = 0

    @staticmethod
    def kv_bytes_per_block(spec: ModelSpec, dtype: torch.dtype, block_size: int,
                           tp_size: int = 1, kv_cache_dtype: str = "auto") -> int:
        """One rank's bytes for one block: it holds num_kv_heads / tp_size of the heads (an
        e4m3 cache: a byte per element plus its rows' scales)."""
        return kv_cache.bytes_per_block(spec.num_layers, block_size,
                                        spec.num_kv_heads // tp_size, spec.head_dim, dtype,
                                        kv_cache_dtype)

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """(Re)allocates the zeroed pool (with an e4m3 cache's scales); drops graphs, which
        hold its address."""
        self.channel.publish(Op.ALLOCATE_KV_CACHE, [num_blocks])
        self.graphs = self.varlen_graphs = self.greedy_loop = None
        self.attention.kv_caches = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        spec = self.spec
        self.attention.kv_caches = kv_cache.allocate(
            spec.num_layers, num_blocks, self.block_size, self.num_kv_heads, spec.head_dim,
            self.dtype, self.config.kv_cache_dtype, self.device)
        self.num_blocks = num_blocks

    def capture_graphs(self, decode_sizes: list[int], varlen_sizes: list[int],
                       capture: GraphCapture, progress: bool = True) -> None:
        """Captures the decode pass per batch size and the varlen pass per token count (after
        the KV cache is allocated); no varlen sizes, no varlen graphs.

        The caller checks that the backends are graph-safe when `capture` is a real CUDA
        graph capture (the CPU stand-in replays eagerly and takes any backend).
        """
        self.channel.publish(Op.CAPTURE_GRAPHS,
                             [len(decode_sizes), *decode_sizes, *varlen_sizes])
        on_cuda = self.device.type == "cuda"
        started = time.monotonic()
        free_before = torch.cuda.mem_get_info(self.device)[0] if on_cuda else 0
        log.info("cuda_graphs_capturing", batch_sizes=len(decode_sizes),
                 max_batch_size=max(decode_sizes), token_counts=len(varlen_sizes),
                 max_tokens=max(varlen_sizes, default=0))
        progress = progress and self.tp.leader
        with torch.inference_mode():
            # The largest pass first: every later graph reuses its memory in the shared pool.
            if varlen_sizes:
                self.varlen_graphs = StepGraphs(varlen_sizes, self._varlen_pass, capture,
                                                "varlen", progress)
            self.graphs = StepGraphs(decode_sizes, self._decode_pass, capture, "decode",
                                     progress)
            self._warm_up_logits()
        if on_cuda:
            torch.cuda.synchronize(self.device)
        log.info("cuda_graphs_captured", graphs=len(decode_sizes) + len(varlen_sizes),
                 seconds=round(time.monotonic() - started, 2),
                 bytes=free_before - torch.cuda.mem_get_info(self.device)[0] if on_cuda else 0)

    @torch.inference_mode()
    def warm_up_decode(self, sizes: list[int]) -> None:
        """Runs the eager decode pass once per batch size (compiles every kernel variant)."""
        self.channel.publish(Op.WARM_UP_DECODE, sizes)
        started = time.monotonic()
        for bs in sizes:
            self._decode_pass(bs)()
        self._warm_up_logits()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("decode_warmed_up", batch_sizes=len(sizes),
                 seconds=round(time.monotonic() - started, 2))

    def _warm_up_logits(self) -> None:
        """Runs the LM head's matmul once per row count a step can sample.

        It runs outside the graphs on the step's own row count, and cuBLAS picks a kernel per
        shape: the first launch of each kernel loads its module, which would otherwise make the
        first step at each new row count late mid-run. No collective: each rank warms its own
        shard. The CPU has no such first-launch cost.
        """
        if self.device.type != "cuda":
            return
        hidden = torch.zeros(self.config.max_num_seqs, self.spec.hidden_size, dtype=self.dtype,
                             device=self.device)
        for rows in range(1, self.config.max_num_seqs + 1):
            self.model.lm_head.shard_logits(hidden[:rows])

    def _decode_pass(self, num_seqs: int) -> Callable[[], torch.Tensor]:
        return self._pass(self.inputs.padding_batch(num_seqs, num_seqs, decode=True))

    def _varlen_pass(self, num_tokens: int) -> Callable[[], torch.Tensor]:
        return self._pass(self.inputs.padding_batch(num_tokens, self._varlen_rows(num_tokens),
                                                    decode=False))

    def _varlen_rows(self, num_tokens: int) -> int:
        """Sequences a varlen graph of `num_tokens` holds: every step of that many tokens."""
        return min(num_tokens, self.config.max_num_seqs)

    def _pass(self, batch: StepBatch) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            self.attention.metadata = batch.attention
            return self.model(batch.input_ids, batch.positions, self.attention)

        return run

    @torch.inference_mode()
    def execute(self, chunks: list[Chunk], pending: PendingTokens | None = None,
                scoring: PromptScoring | None = None, drafts: DeviceDrafts | None = None
                ) -> tuple[torch.Tensor, PromptScores | None]:
        """Runs the step and returns logits [S, vocab] (the weights' dtype) for the chunks that
        sample, and the prompt logprobs that `scoring` (`prompt_scoring(chunks)`) asks for.

        Never waits for the device: the caller's one read of the sampled tokens is the sync.
        `pending` supplies input tokens that the previous step sampled and the host has not
        read yet: they are copied into place on the device.
        """
        pad_rows = pad_tokens = None
        num_tokens = sum(c.num_tokens for c in chunks)
        token_rows = self._as_token_rows(chunks, num_tokens, scoring)
        if num_tokens == len(chunks) or token_rows:
            if self.graphs is not None:
                pad_rows = self.graphs.padded_size(num_tokens)
        elif self.varlen_graphs is not None:
            pad_tokens = self.varlen_graphs.padded_size(num_tokens)
            if pad_tokens is not None:
                pad_rows = self._varlen_rows(pad_tokens)
        batch = self.inputs.build(chunks, pad_rows, pad_tokens,
                                  None if scoring is None else scoring.scored, token_rows)
        graphed = pad_rows is not None
        if pending is not None and pending.rows:
            rows = upload(self.inputs.chunk_starts(pending.rows), torch.int64, self.device)
            sources = upload(pending.sources, torch.int64, self.device)
            batch.input_ids.index_copy_(0, rows, pending.tokens[sources].to(torch.int32))
        if drafts is not None and drafts.rows:
            self._copy_drafts(chunks, drafts, batch.input_ids)
        self.channel.publish(Op.STEP, step_args(batch.layout, graphed), batch.layout)
        logits, scores = self._forward(batch, graphed, scoring)
        assert logits is not None, "only rank 0 executes scheduled chunks"
        return logits, scores

    def _copy_drafts(self, chunks: list[Chunk], drafts: DeviceDrafts,
                     input_ids: torch.Tensor) -> None:
        """Writes draft tokens still on the device into their chunks' last input slots (the
        host wrote stand-ins there)."""
        lengths = np.asarray(drafts.lengths, dtype=np.int64)
        ends = (self.inputs.chunk_starts(drafts.rows).astype(np.int64)
                + np.asarray([chunks[r].num_tokens for r in drafts.rows], dtype=np.int64))
        total = int(lengths.sum())
        first = np.repeat(ends - lengths, lengths)
        column = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        index = upload(np.stack([first + column, np.repeat(np.arange(len(lengths)), lengths),
                                 column]), torch.int64, self.device)
        input_ids.index_copy_(0, index[0], drafts.tokens[index[1], index[2]].to(torch.int32))

    def _as_token_rows(self, chunks: list[Chunk], num_tokens: int,
                       scoring: PromptScoring | None) -> bool:
        """Whether a step of short chunks runs as decode rows, one per token (`StepInputs.build`):
        a draft to verify, or a draft model's catch-up, is a few tokens past the cache, where the
        decode kernel and its graphs beat the varlen path. Only when speculating."""
        if (num_tokens == len(chunks) or scoring is not None or not self.config.max_draft_tokens
                or num_tokens > self.inputs.max_seqs):
            return False
        if self.graphs is not None and self.graphs.padded_size(num_tokens) is None:
            return False
        return all(c.num_tokens <= 1 + self.config.max_draft_tokens for c in chunks)

    def capture_greedy_loop(self, passes: int, sizes: list[int], capture: GraphCapture,
                            progress: bool = True) -> None:
        """A draft model's runner: captures `passes` greedy decode passes per batch size (after
        the KV cache is allocated); rank 0 alone."""
        assert self.tp.size == 1
        with torch.inference_mode():
            self.greedy_loop = GreedyDecodeLoop(self._logits_of, passes, sizes,
                                                self.inputs.max_pages, self.block_size,
                                                self.device, capture, progress)

    def _logits_of(self, input_ids: torch.Tensor, positions: torch.Tensor,
                   metadata: AttentionMetadata) -> torch.Tensor:
        self.attention.metadata = metadata
        return self.model.compute_logits(self.model(input_ids, positions, self.attention))

    @torch.inference_mode()
    def decode_greedy(self, first: torch.Tensor, seqs: list[ChunkSequence], wanted: list[int]
                      ) -> torch.Tensor:
        """Greedy guesses past each of `seqs` (none pending), whose next token `first[i]` (on
        the device) the step just executed drew: wanted[i] in all, first[i] the first, as row i
        of [len(seqs), 1 + passes] (columns past wanted[i] meaningless). Their pages must
        already hold the new positions."""
        if self.greedy_loop is None:
            return first[:, None]
        table = self.inputs.mirror.table[self.inputs.mirror.rows(seqs)]
        return self.greedy_loop.run(first, [len(s.token_ids) for s in seqs], table, wanted)

    def _forward(self, batch: StepBatch, graphed: bool, scoring: PromptScoring | None = None
                 ) -> tuple[torch.Tensor | None, PromptScores | None]:
        """The sampling rows' logits and, where the step scores the prompt, its scores (rank
        0 passes `scoring`; the other ranks run the same LM head passes without it)."""
        layout = batch.layout
        graphs = self.graphs if layout.decode else self.varlen_graphs
        if graphed:
            assert graphs is not None
            hidden = graphs.replay(layout.rows if layout.decode else layout.num_tokens)
        else:
            self.attention.metadata = batch.attention
            hidden = self.model(batch.input_ids, batch.positions, self.attention)
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        scores = None
        if layout.num_prompt_rows:
            # Read from the hidden states before anything replays over a graph's output.
            scores = score_prompt(hidden[batch.prompt_rows], self.model.compute_logits,
                                  self.config.max_num_seqs, scoring)
        return logits, scores

    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks other than 0: mirrors rank 0's runner calls until it says stop."""
        while True:
            op, args = self.channel.receive()
            if op == Op.STEP:
                self._forward(self.inputs.view(step_layout(args)), bool(args[-1]))
            elif op == Op.ALLOCATE_KV_CACHE:
                self.allocate_kv_cache(args[0])
            elif op == Op.CAPTURE_GRAPHS:
                capture = CudaGraphCapture() if self.device.type == "cuda" else eager_capture
                self.capture_graphs(args[1 : 1 + args[0]], args[1 + args[0] :], capture)
            elif op == Op.WARM_UP_DECODE:
                self.warm_up_decode(args)
            else:
                return

    def shutdown(self) -> None:
        """Rank 0: lets the other ranks' `follow()` return, leaves the group with them (NCCL's
        teardown waits for every rank), then waits for their processes to exit."""
        if self.rank_processes is not None:
            self.rank_processes.stopping = True
        self.channel.publish(Op.STOP)
        self.leave_group()
        if self.rank_processes is not None:
            self.rank_processes.join()

    def leave_group(self) -> None:
        """Drops the decode graphs first: NCCL's teardown waits until no graph holds its
        captured collectives."""
        self.graphs = self.varlen_graphs = self.greedy_loop = None
        gc.collect()
        self.tp.close()
