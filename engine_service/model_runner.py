"""Runs the model over one scheduled step: builds the flat batch, the KV metadata, the logits."""

import math
from dataclasses import dataclass

import structlog
import torch

from llmserve.engine_service.attention import AttentionMetadata, TorchAttentionBackend
from llmserve.engine_service.checkpoint import ModelSpec, iter_safetensors
from llmserve.engine_service.models.decoder import DecoderModel
from llmserve.engine_service.scheduler import ScheduledChunk

log = structlog.get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StepBatch:
    """The seam between scheduler and runner: one flat batch of tokens for one forward pass."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: AttentionMetadata
    logits_indices: torch.Tensor  # [S]: rows of the flat batch whose logits pick a token


def resolve_dtype(requested: str, spec: ModelSpec, device: torch.device) -> torch.dtype:
    """`auto` = the checkpoint's dtype on a GPU, fp32 on the CPU (bf16 matmuls are slow there)."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    return DTYPES.get(spec.torch_dtype, torch.bfloat16)


class ModelRunner:
    """Owns the weights and the KV cache on one device and computes logits for a step."""

    def __init__(
        self,
        model_dir,
        spec: ModelSpec,
        device: torch.device,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
    ) -> None:
        self.spec, self.device, self.dtype, self.block_size = spec, device, dtype, block_size
        with torch.device(device):
            self.model = DecoderModel(spec).to(dtype)
        self.model.load_weights(iter_safetensors(model_dir))
        self.model.eval()
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(spec.num_layers)
        ]
        self.backend = TorchAttentionBackend(self.kv_caches, 1.0 / math.sqrt(spec.head_dim))

    @staticmethod
    def kv_bytes_per_block(spec: ModelSpec, dtype: torch.dtype, block_size: int) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * itemsize

    def build_batch(self, chunks: list[ScheduledChunk]) -> StepBatch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        max_pages = max(len(c.seq.block_ids) for c in chunks)
        block_tables = torch.zeros(len(chunks), max_pages, dtype=torch.int32)
        for row, chunk in enumerate(chunks):
            seq, end = chunk.seq, chunk.start + chunk.num_tokens
            input_ids.extend(seq.token_ids[chunk.start : end])
            span = range(chunk.start, end)
            positions.extend(span)
            slots.extend(seq.block_ids[p // bs] * bs + p % bs for p in span)
            query_start_loc.append(len(input_ids))
            seq_lens.append(end)
            block_tables[row, : len(seq.block_ids)] = torch.tensor(seq.block_ids, dtype=torch.int32)
            if chunk.samples:
                logits_indices.append(len(input_ids) - 1)

        def tensor(values: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        return StepBatch(
            input_ids=tensor(input_ids, torch.int64),
            positions=tensor(positions, torch.int64),
            attention=AttentionMetadata(
                query_start_loc=tensor(query_start_loc, torch.int32),
                seq_lens=tensor(seq_lens, torch.int32),
                block_tables=block_tables.to(self.device, non_blocking=True),
                slot_mapping=tensor(slots, torch.int64),
            ),
            logits_indices=tensor(logits_indices, torch.int64),
        )

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Runs the step and returns fp32 logits [S, vocab] for the chunks that sample."""
        batch = self.build_batch(chunks)
        self.backend.metadata = batch.attention
        hidden = self.model(batch.input_ids, batch.positions, self.backend)
        return self.model.compute_logits(hidden[batch.logits_indices])
