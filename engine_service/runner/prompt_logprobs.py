"""Prompt logprobs: each prompt token after the first, scored under the logits of the position
before it, with the top alternatives, while the prompt is prefilled.

A chunk of positions [start, end) scores the prompt tokens start + 1 .. min(end, P - 1), so a
prompt split over steps is scored whole: the first token of a chunk was scored by the last
position of the chunk before it (the host knows every prompt token). Only the rows of chunks
that ask pass the LM head a second time, in slices of at most `max_num_seqs` rows: no more
vocabulary-sized rows at once than the sampler already takes on a full batch.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch

from llmserve.engine_service.runner.chunk import Chunk
from llmserve.engine_service.runner.sampler import logprob_tensors, token_logprobs
from llmserve.engine_service.runner.step_inputs import upload
from llmserve.engine_service.seam import TokenLogprobs


@dataclass(frozen=True)
class PromptScoring:
    """The prompt tokens a step scores, chunk by chunk in step order (rank 0's host view)."""

    chunks: list[int]  # indexes of the chunks that score
    counts: list[int]  # tokens each of them scores
    alternatives: list[int]  # alternatives each of them wants
    token_ids: list[int]  # the scored tokens, flat

    @property
    def scored(self) -> list[tuple[int, int]]:
        """(chunk index, tokens scored) per scoring chunk: what the step inputs lay out."""
        return list(zip(self.chunks, self.counts, strict=True))


def prompt_scoring(chunks: list[Chunk]) -> PromptScoring | None:
    """What the step scores; None when no chunk asks."""
    asking = [(i, c, k) for i, c in enumerate(chunks) if (k := c.prompt_logprobs) is not None]
    if not asking:
        return None
    scoring = PromptScoring([], [], [], [])
    for i, chunk, k in asking:
        seq = chunk.seq
        count = min(chunk.start + chunk.num_tokens, seq.num_prompt_tokens - 1) - chunk.start
        scoring.chunks.append(i)
        scoring.counts.append(count)
        scoring.alternatives.append(k)
        scoring.token_ids.extend(seq.token_ids[chunk.start + 1 : chunk.start + 1 + count])
    return scoring


@dataclass(frozen=True)
class PromptScores:
    """A step's prompt logprobs on the device (rank 0), with the scoring that asked for them."""

    scoring: PromptScoring
    chosen: torch.Tensor  # [R]
    top_values: torch.Tensor  # [R, K]
    top_ids: torch.Tensor  # [R, K]

    def read(self) -> Iterator[tuple[int, list[TokenLogprobs]]]:
        """(chunk index, its scored tokens in position order) per scoring chunk; waits for the
        device."""
        scoring = self.scoring
        counts = [k for k, n in zip(scoring.alternatives, scoring.counts, strict=True)
                  for _ in range(n)]
        rows = token_logprobs(scoring.token_ids, self.chosen, self.top_values, self.top_ids,
                              counts)
        first = 0
        for i, n in zip(scoring.chunks, scoring.counts, strict=True):
            yield i, cast(list[TokenLogprobs], rows[first : first + n])  # every row asked
            first += n


def score_prompt(hidden: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor | None],
                 slice_rows: int, scoring: PromptScoring | None) -> PromptScores | None:
    """Scores the prompt rows `hidden` [R, hidden] in slices. Every tensor-parallel rank runs the
    same slices (the LM head gathers its shards on rank 0); only rank 0 passes `scoring` and gets
    the scores."""
    parts = []
    targets = None if scoring is None else upload(scoring.token_ids, torch.int64, hidden.device)
    k = 0 if scoring is None else max(scoring.alternatives)
    for first in range(0, hidden.shape[0], slice_rows):
        logits = lm_head(hidden[first : first + slice_rows])
        if logits is not None and targets is not None:
            parts.append(logprob_tensors(logits, targets[first : first + slice_rows], k))
    if scoring is None:
        return None
    chosen, top_values, top_ids = (torch.cat(column) for column in zip(*parts, strict=True))
    return PromptScores(scoring, chosen, top_values, top_ids)
