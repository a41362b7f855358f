"""One step's flat batch: built with numpy in a host buffer, copied to the device in one go.

Every input lives at a fixed offset of one int32 buffer, pinned on the host and mirrored on the
device, so a step costs one non-blocking copy, and CUDA graphs captured on views of the device
buffer read each new step's inputs from the same addresses.
"""

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from llmserve.engine_service.attention.layer import AttentionMetadata
from llmserve.engine_service.runner.block_table import BlockTableMirror
from llmserve.engine_service.runner.chunk import Chunk

ALIGN = 32  # int32 elements: 128 bytes


def upload(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device` without waiting: a pageable copy would wait for the step
    in flight, a pinned non-blocking one does not.

    A 2-D upload's rows each start on a 16-byte boundary (a view of a padded copy): callers
    hand its rows to kernels one by one, and Triton compiles a kernel once per alignment of its
    pointers, so a row starting mid-word (an odd row length) would compile one again in the
    middle of serving."""
    host = torch.as_tensor(np.asarray(values), dtype=dtype)
    width = host.shape[-1] if host.dim() == 2 else None
    if width is not None:
        per_16_bytes = max(16 // host.element_size(), 1)
        padded = torch.zeros(host.shape[0], -(-width // per_16_bytes) * per_16_bytes,
                             dtype=dtype)
        padded[:, :width] = host
        host = padded
    if device.type == "cuda":
        host = host.pin_memory()
    on_device = host.to(device, non_blocking=True)
    return on_device if width is None else on_device[:, :width]


def _input_tokens(chunk: Chunk) -> list[int]:
    """A varlen chunk's input tokens: its known ones (a pending one as the token before it),
    then its draft's."""
    seq, draft = chunk.seq, chunk.draft
    first = chunk.start - seq.num_pending_tokens
    known = seq.token_ids[first : first + chunk.num_tokens - len(draft)]
    return known + draft if draft else known


@dataclass(frozen=True)
class BatchLayout:
    """How much of the buffer one step uses: with the buffer's contents, all another
    tensor-parallel rank needs to run the same step."""

    num_tokens: int
    rows: int  # sequences including padding
    num_sampling: int
    num_seqs: int  # rows before padding
    decode: bool  # a row per token
    max_query_len: int
    end: int  # int32 elements of the buffer in use
    num_prompt_rows: int = 0  # rows whose logits score a prompt token (prompt logprobs)


@dataclass
class StepBatch:
    """The seam between scheduler and runner: one flat batch of tokens for one forward pass."""

    input_ids: torch.Tensor  # [T] int32
    positions: torch.Tensor  # [T] int32
    attention: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int32: rows of the flat batch whose logits pick a token
    prompt_rows: torch.Tensor  # [R] int32: rows of the flat batch whose logits score the prompt
    num_seqs: int  # rows before padding (rows past it are padding)
    layout: BatchLayout


class StepInputs:
    """Fixed-address input buffers for up to `max_tokens` tokens in `max_seqs` sequences, each
    sampling up to `max_logits_per_seq` tokens (1 + the longest draft, when speculating)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_pages: int, block_size: int,
                 device: torch.device, max_logits_per_seq: int = 1) -> None:
        self.max_tokens, self.max_seqs, self.max_pages = max_tokens, max_seqs, max_pages
        self.block_size, self.device = block_size, device
        sizes = {"input_ids": max_tokens, "positions": max_tokens, "slots": max_tokens,
                 "seq_lens": max_seqs, "query_start_loc": max_seqs + 1,
                 "logits_indices": max_seqs * max_logits_per_seq,
                 "decode_order": max_seqs,
                 "block_tables": max_seqs * max_pages,
                 "prompt_rows": max_tokens}
        # Block tables, then prompt rows last: a step copies the buffer up to its last used
        # table row, or its last prompt row if it scores the prompt. Each section starts
        # 128-byte aligned, so kernels see aligned pointers whatever the sizes.
        self.offsets: dict[str, int] = {}
        total = 0
        for name, size in sizes.items():
            self.offsets[name] = total
            total = -(-(total + size) // ALIGN) * ALIGN
        on_cuda = device.type == "cuda"
        self.host = torch.zeros(total, dtype=torch.int32, pin_memory=on_cuda)
        self.device_buffer = (torch.zeros(total, dtype=torch.int32, device=device)
                              if on_cuda else self.host)
        whole = self.host.numpy()
        self.np = {name: whole[self.offsets[name] : self.offsets[name] + size]
                   for name, size in sizes.items()}
        self.host_tables = self.np["block_tables"].reshape(max_seqs, max_pages)
        self.mirror = BlockTableMirror(max_seqs, max_pages)
        self._chunk_firsts = np.zeros(max_tokens, dtype=np.int64)
        # Recorded after each copy: the host buffer is not refilled while a copy still reads it.
        self._copied = torch.cuda.Event() if on_cuda else None

    def build(self, chunks: list[Chunk], pad_rows: int | None = None,
              pad_tokens: int | None = None,
              scored: list[tuple[int, int]] | None = None,
              token_rows: bool = False) -> StepBatch:
        """Fills the buffers for `chunks` and copies them to the device (without a sync).

        A decode step has one row per token: every chunk of one token, or, with `token_rows`,
        each token of every chunk its own row, attending to its sequence's cache up to its own
        position (a short chunk past the cached tokens, such as a draft to verify, then runs as
        decode rows). Otherwise the step is varlen: a row per chunk.

        Padding (for a graph replay) appends rows up to `pad_rows` and, in a varlen step,
        tokens up to `pad_tokens`: a padding token is token 0 at position 0 in slot -1 (stores
        nothing) and belongs to no sequence; a padding row has seq_len 0 (attends to nothing)
        and, in a varlen step, no tokens.

        A token still pending (sampled by the step in flight, so only on the device) is written
        as the token before it, a stand-in that the runner overwrites on the device.

        `scored` lists (chunk index, n) for the chunks whose first n tokens' logits score the
        prompt (prompt logprobs).
        """
        num_chunks = len(chunks)
        starts = np.fromiter((c.start for c in chunks), np.int64, num_chunks)
        counts = np.fromiter((c.num_tokens for c in chunks), np.int64, num_chunks)
        num_tokens = int(counts.sum())
        one_each = num_tokens == num_chunks
        decode = one_each or token_rows
        real_rows = num_tokens if decode else num_chunks
        rows = real_rows if pad_rows is None else pad_rows
        tokens = rows if decode else num_tokens if pad_tokens is None else pad_tokens
        if tokens > self.max_tokens or rows > self.max_seqs:
            raise ValueError(f"step of {tokens} tokens in {rows} rows exceeds the buffers "
                             f"({self.max_tokens} tokens, {self.max_seqs} sequences)")
        if rows < real_rows or tokens < num_tokens or (decode and pad_tokens is not None):
            raise ValueError(f"cannot pad a step of {num_tokens} tokens in {num_chunks} "
                             f"sequences to {tokens} tokens in {rows} rows")
        if self._copied is not None:
            self._copied.synchronize()
        h = self.np
        table_rows = self.mirror.rows([c.seq for c in chunks])
        # Where each chunk starts in the flat batch.
        firsts = self._chunk_firsts[:num_chunks]
        firsts[:1] = 0
        np.cumsum(counts[:-1], out=firsts[1:])
        qsl = h["query_start_loc"]
        if one_each:
            h["input_ids"][:num_tokens] = [c.seq.token_ids[c.start - c.seq.num_pending_tokens]
                                           for c in chunks]
            positions = starts
            flat_rows = table_rows
        else:
            h["input_ids"][:num_tokens] = np.fromiter(
                itertools.chain.from_iterable(map(_input_tokens, chunks)),
                np.int32, num_tokens)
            positions = np.arange(num_tokens) + np.repeat(starts - firsts, counts)
            flat_rows = np.repeat(table_rows, counts)
        if decode:
            qsl[: rows + 1] = np.arange(rows + 1)
            h["seq_lens"][:num_tokens] = positions + 1
            np.take(self.mirror.table, flat_rows, axis=0, out=self.host_tables[:num_tokens])
        else:
            qsl[0] = 0
            np.cumsum(counts, out=qsl[1 : num_chunks + 1], dtype=np.int32)
            qsl[num_chunks + 1 : rows + 1] = num_tokens
            h["seq_lens"][:num_chunks] = starts + counts
            np.take(self.mirror.table, table_rows, axis=0, out=self.host_tables[:num_chunks])
        bs = self.block_size
        h["positions"][:num_tokens] = positions
        h["slots"][:num_tokens] = (self.mirror.table[flat_rows, positions // bs] * bs
                                   + positions % bs)
        ends = firsts + counts
        if any(c.draft for c in chunks):
            # A chunk with a draft samples at its last 1 + len(draft) tokens: its own next
            # token after each draft token.
            indices = [end - 1 - j for c, end in zip(chunks, ends.tolist(), strict=True)
                       if c.samples for j in range(len(c.draft), -1, -1)]
            num_sampling = len(indices)
            h["logits_indices"][:num_sampling] = indices
        else:
            sampling = np.fromiter((c.samples for c in chunks), bool, num_chunks)
            num_sampling = int(sampling.sum())
            h["logits_indices"][:num_sampling] = ends[sampling] - 1
        self._write_padding(num_tokens, tokens, real_rows, rows)
        if decode:
            # Longest first: the decode kernel starts the longest rows' programs first, so
            # that short ones, not long ones, finish the last wave (docs/benchmarks.md).
            h["decode_order"][:rows] = np.argsort(-h["seq_lens"][:rows], kind="stable")
        # Padding rows read no block table: only the real rows' tables are copied.
        end = self.offsets["block_tables"] + real_rows * self.max_pages
        num_prompt_rows = 0
        if scored:
            prompt_rows = np.concatenate([firsts[i] + np.arange(n) for i, n in scored])
            num_prompt_rows = len(prompt_rows)
            h["prompt_rows"][:num_prompt_rows] = prompt_rows
            end = self.offsets["prompt_rows"] + num_prompt_rows
        self._upload(end)
        return self.view(BatchLayout(tokens, rows, num_sampling, real_rows, decode,
                                     1 if decode else int(counts.max(initial=0)), end,
                                     num_prompt_rows))

    def chunk_starts(self, chunks: list[int]) -> np.ndarray:
        """Where chunks `chunks` of the step last built start in its flat batch."""
        return self._chunk_firsts[chunks]

    def padding_batch(self, num_tokens: int, rows: int, decode: bool) -> StepBatch:
        """Views of the device buffers as a step of padding only (for graph capture): `rows`
        sequences of one token each (decode), or of no tokens beside `num_tokens` padding
        tokens (varlen). Whatever the buffers hold is read at replay."""
        if self._copied is not None:
            self._copied.synchronize()
        h = self.np
        self._write_padding(0, num_tokens, 0, rows)
        h["query_start_loc"][: rows + 1] = np.arange(rows + 1) if decode else 0
        h["logits_indices"][:rows] = np.arange(rows)
        h["decode_order"][:rows] = np.arange(rows)
        end = self.offsets["block_tables"]
        self._upload(end)
        return self.view(BatchLayout(num_tokens, rows, rows, rows, decode,
                                     1 if decode else num_tokens, end))

    def _write_padding(self, first_token: int, tokens: int, first_row: int, rows: int) -> None:
        """Padding tokens: token 0 at position 0 in slot -1 (stores nothing); padding rows:
        seq_len 0 (attend to nothing)."""
        h = self.np
        h["input_ids"][first_token:tokens] = 0
        h["positions"][first_token:tokens] = 0
        h["slots"][first_token:tokens] = -1
        h["seq_lens"][first_row:rows] = 0

    def _upload(self, end: int) -> None:
        if self.device_buffer is self.host:
            return
        self.device_buffer[:end].copy_(self.host[:end], non_blocking=True)
        assert self._copied is not None
        self._copied.record()

    def view(self, layout: BatchLayout) -> StepBatch:
        """The step at `layout` as views of the device buffer (which must hold its inputs)."""
        buf, off = self.device_buffer, self.offsets
        num_tokens, rows = layout.num_tokens, layout.rows

        def view(name: str, size: int) -> torch.Tensor:
            return buf[off[name] : off[name] + size]

        tables = view("block_tables", self.max_seqs * self.max_pages)
        return StepBatch(
            input_ids=view("input_ids", num_tokens),
            positions=view("positions", num_tokens),
            attention=AttentionMetadata(
                query_start_loc=view("query_start_loc", rows + 1),
                seq_lens=view("seq_lens", rows),
                block_tables=tables.view(self.max_seqs, self.max_pages)[:rows],
                slot_mapping=view("slots", num_tokens),
                decode_only=layout.decode,
                max_query_len=layout.max_query_len,
                decode_order=view("decode_order", rows) if layout.decode else None,
            ),
            logits_indices=view("logits_indices", layout.num_sampling),
            prompt_rows=view("prompt_rows", layout.num_prompt_rows),
            num_seqs=layout.num_seqs,
            layout=layout,
        )
