"""One step's sampling rows as the sampler's batch: per-row options, seeds and positions, and
the logits processing and grammar masks of the rows that ask."""

from collections.abc import Callable

import numpy as np
import torch

from llmserve.engine_service.core.scheduler import ScheduledChunk
from llmserve.engine_service.core.sequence import Sequence
from llmserve.engine_service.core.structured_output import StructuredOutputs
from llmserve.engine_service.runner.logits_processors import LogitsProcessors
from llmserve.engine_service.runner.sampler import SamplingBatch
from llmserve.engine_service.runner.step_inputs import upload
from llmserve.engine_service.runner.token_bitmask import GrammarBitmask


def sampling_batch(sampling: list[ScheduledChunk], device: torch.device,
                   processors: LogitsProcessors, structured: StructuredOutputs,
                   live: Callable[[Sequence], bool]) -> SamplingBatch:
    """One row per token drawn: a chunk with a draft draws after each of its tokens. `live`
    tells the sequences still running (a finished one's row draws, unmasked, for nothing)."""
    drafts = None
    if any(c.draft for c in sampling):
        chunks = [c for c in sampling for _ in range(1 + len(c.draft))]
        positions = [c.seq.num_tokens + j for c in sampling for j in range(1 + len(c.draft))]
        drafts = [(j, c.draft) for c in sampling for j in range(1 + len(c.draft))]
    else:
        chunks, positions = sampling, [c.seq.num_tokens for c in sampling]
    opts = [c.seq.sampling for c in chunks]
    # Two copies to the device, not one per column: each costs the host more than its bytes.
    floats = upload(np.array([[o.temperature for o in opts], [o.top_p for o in opts],
                              [o.min_p for o in opts]], dtype=np.float32), torch.float32, device)
    # Seeds are 64-bit unsigned; reinterpret as signed to fit int64.
    seeds = [c.seq.seed - (1 << 64) if c.seq.seed >= 1 << 63 else c.seq.seed for c in chunks]
    ints = upload(np.array([[o.top_k for o in opts], seeds, positions], dtype=np.int64),
                  torch.int64, device)
    return SamplingBatch(
        temperature=floats[0],
        top_p=floats[1],
        top_k=ints[0],
        min_p=floats[2],
        seeds=ints[1],
        positions=ints[2],
        num_logprobs=[o.logprobs for o in opts],
        all_greedy=all(o.temperature == 0 for o in opts),
        any_greedy=any(o.temperature == 0 for o in opts),
        filtered=any(o.top_k > 0 or o.top_p < 1 or o.min_p > 0 for o in opts),
        processing=(processors.prepare([c.seq for c in chunks], drafts)
                    if any(o.processes_logits for o in opts) else None),
        grammar=(grammar_bitmask(chunks, structured, live, drafts is not None)
                 if any(o.structured_output is not None for o in opts) else None),
    )


def grammar_bitmask(chunks: list[ScheduledChunk], structured: StructuredOutputs,
                    live: Callable[[Sequence], bool], with_drafts: bool = False
                    ) -> GrammarBitmask | None:
    """The next-token masks of the rows whose sequence follows a grammar (each has accepted
    every token before the one drawn here). A chunk with a draft has 1 + len(draft) rows in a
    row, the j-th drawn after the draft's first j tokens: its matcher takes them one round at a
    time, masking each row from the state before it, and rolls back after (attach_drafts made
    sure it accepts them). `with_drafts`: some chunk has a draft (else one fill, as ever)."""
    rows = [r for r, c in enumerate(chunks) if c.seq.grammar is not None and live(c.seq)]
    if not rows:
        return None
    assert not any(chunks[r].seq.num_pending_tokens for r in rows), "mask past a pending token"
    offsets = [0] * len(rows)  # each row's draft tokens before it
    for i in range(1, len(rows)) if with_drafts else ():
        if chunks[rows[i]] is chunks[rows[i - 1]] and rows[i] == rows[i - 1] + 1:
            offsets[i] = offsets[i - 1] + 1
    if not any(offsets):
        grammars = [chunks[r].seq.grammar for r in rows]
        return GrammarBitmask(structured.fill_bitmask(grammars), rows)  # type: ignore[arg-type]
    masks, ordered = [], []
    for j in range(max(offsets) + 1):
        round_rows = [r for r, offset in zip(rows, offsets, strict=True) if offset == j]
        for r in round_rows if j else ():
            chunk = chunks[r]
            chunk.seq.grammar.consume_token(chunk.draft[j - 1])  # type: ignore[union-attr]
        masks.append(structured.fill_bitmask(
            [chunks[r].seq.grammar for r in round_rows]))  # type: ignore[misc]
        ordered += round_rows
    for r, offset in zip(rows, offsets, strict=True):
        if offset and (r + 1 not in rows or chunks[r + 1] is not chunks[r]):
            chunks[r].seq.grammar.rollback(offset)  # type: ignore[union-attr]
    return GrammarBitmask(torch.cat(masks), ordered)
