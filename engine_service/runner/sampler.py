"""Token selection for a whole batch at once: greedy, temperature, top-k, top-p, min-p, logprobs
(after min_tokens, logit_bias and the penalties: runner/logits_processors.py).

Randomness is keyed on (request seed, position, token id) through a counter-based hash, so a
seeded request draws the same tokens in any batch, after preemption, and on another engine.
"""

from dataclasses import dataclass

import torch

from llmserve.engine_service.runner.logits_processors import LogitsProcessing
from llmserve.engine_service.runner.token_bitmask import GrammarBitmask
from llmserve.engine_service.seam import TokenLogprobs
from llmserve.kernels.sampling import gumbel_sample

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32 without int64 overflow: multiply 16-bit halves."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (lowbias32 constants)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keyed_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """U(0, 1) noise [N, V] that depends only on each row's (seed, position) and the token id."""
    seeds = seeds.to(torch.int64)
    row = _mix32(seeds & _MASK32)
    row = _mix32(row ^ ((seeds >> 32) & _MASK32))
    row = _mix32(row ^ (positions.to(torch.int64) & _MASK32))
    tokens = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)
    bits = _mix32(row[:, None] ^ _mix32(tokens)[None, :])
    return (bits.double() + 0.5) / 2.0**32


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors on the logits' device."""

    temperature: torch.Tensor  # [N] float; 0 = greedy
    top_p: torch.Tensor  # [N] float
    top_k: torch.Tensor  # [N] int64; 0 = off
    min_p: torch.Tensor  # [N] float
    seeds: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64: the position the drawn token will take
    num_logprobs: list[int | None]
    # Known on the host, so choosing a path costs no device sync.
    all_greedy: bool = False
    any_greedy: bool = True
    filtered: bool = True  # some row uses top-k, top-p or min-p
    # min_tokens, logit_bias and penalties of the rows that ask; None = no row does.
    processing: LogitsProcessing | None = None
    # Structured output's token masks of the rows that follow a grammar; None = no row does.
    grammar: GrammarBitmask | None = None


class Sampler:
    """Draws one token per row of logits and, where asked, their log-probabilities."""

    def __call__(
        self, logits: torch.Tensor, batch: SamplingBatch
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        token_list = self.sample(logits, batch).tolist()
        return token_list, self.logprobs(logits, token_list, batch.num_logprobs)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The drawn tokens [N] on the logits' device, without waiting for them.

        `logits` may be in the model's dtype: the greedy argmax and the one-pass kernel read
        them as they are, the other paths in fp32.
        """
        if batch.processing is not None:
            logits = batch.processing.apply(logits)  # an fp32 copy: logprobs read the original
        if batch.grammar is not None:  # forbidden tokens to -inf, before any filter or draw
            logits = batch.grammar.apply(logits, copy=batch.processing is None and any(
                n is not None for n in batch.num_logprobs))
        if batch.all_greedy:
            return logits.argmax(dim=-1)
        # No greedy row, no mask: the common sampled batch launches nothing it does not use.
        greedy = batch.temperature == 0 if batch.any_greedy else None
        if logits.is_cuda and not batch.filtered:
            # Same keyed noise and the same race (Gumbel-max is the log of the exponential
            # race), in one pass over the logits instead of a softmax, a sort and a scatter.
            temperature = (batch.temperature if greedy is None
                           else torch.where(greedy, 1.0, batch.temperature))
            drawn = gumbel_sample(logits, temperature, batch.seeds, batch.positions)
        else:
            drawn = self._draw(logits.float(), batch)
        return drawn if greedy is None else torch.where(greedy, logits.argmax(dim=-1), drawn)

    def _draw(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        temperature = torch.where(batch.temperature == 0, 1.0, batch.temperature)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
        drop = (batch.top_k[:, None] > 0) & (rank >= batch.top_k[:, None])
        # Keep the smallest head whose mass reaches top_p (the top token always stays).
        top_p = batch.top_p[:, None]
        drop |= (top_p < 1) & ((sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p)
        drop |= sorted_probs < batch.min_p[:, None] * sorted_probs[:, :1]
        drop[:, 0] = False
        kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) is a draw from p.
        noise = -torch.log(keyed_uniform(batch.seeds, batch.positions, probs.shape[-1]))
        return (kept.double() / noise).argmax(dim=-1)

    @staticmethod
    def logprobs(
        logits: torch.Tensor, tokens: list[int], counts: list[int | None]
    ) -> list[TokenLogprobs | None]:
        """The chosen tokens' log-probabilities and the top-n alternatives, where asked."""
        wanted = [n for n in counts if n is not None]
        if not wanted:
            return [None] * len(tokens)
        chosen, top_values, top_ids = logprob_tensors(
            logits, torch.tensor(tokens, device=logits.device), max(wanted))
        return token_logprobs(tokens, chosen, top_values, top_ids, counts)


def logprob_tensors(
    logits: torch.Tensor, tokens: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The raw log-softmax of each row read at its token [N], and its top max(k, 1) values and
    ids [N, k], on the logits' device without waiting."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens.to(torch.int64)[:, None])[:, 0]
    top_values, top_ids = logprobs.topk(max(k, 1), dim=-1)
    return chosen, top_values, top_ids


def token_logprobs(
    tokens: list[int], chosen: torch.Tensor, top_values: torch.Tensor, top_ids: torch.Tensor,
    counts: list[int | None]
) -> list[TokenLogprobs | None]:
    """`logprob_tensors`' rows on the host, with each row's first `counts[r]` alternatives
    (None: the row asked for none)."""
    chosen_l, top_v, top_i = chosen.tolist(), top_values.tolist(), top_ids.tolist()
    return [
        None
        if n is None
        else TokenLogprobs(
            tokens[r], chosen_l[r], list(zip(top_i[r][:n], top_v[r][:n], strict=True))
        )
        for r, n in enumerate(counts)
    ]
