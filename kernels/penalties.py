"""The repetition, frequency and presence penalties of the rows that ask, in one pass over their
logits (vLLM's `apply_penalties`, fused).

Each penalized row reads its sequence's row of a packed count table: entry `token` holds how
many times the output holds the token in its low 30 bits (COUNT_MASK) and whether the prompt
holds it in bit 30 (PROMPT_BIT). Per row, with params (presence, frequency, repetition):

    seen = packed != 0                       # prompt or output holds the token
    logit = logit / repetition if logit > 0 else logit * repetition     (where seen)
    logit -= frequency * count
    logit -= presence * (count > 0)

The kernel skips blocks of the vocabulary that no token of the sequence falls in (most of it):
those logits are neither read nor written.
"""

import torch
import triton
import triton.language as tl

from llmserve.kernels.dependent_launch import await_previous_kernel, dependent_launch

PROMPT_BIT = 1 << 30
COUNT_MASK = PROMPT_BIT - 1
BLOCK = 1024
COUNT_MASK_C: tl.constexpr = tl.constexpr(COUNT_MASK)  # as the compiled kernel may read it


def apply_penalties_torch(logits: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                          counts: torch.Tensor, params: torch.Tensor) -> None:
    """In place on fp32 logits [N, V]: rows [P] of the logits take the penalties of count-table
    rows slots [P] (counts [S, V] int32, packed) with params[slots] [P, 3] = (presence,
    frequency, repetition).

    Only the entries of seen tokens change (for the others every term is a no-op), so only
    those are computed: 6x faster on the CPU than the dense form at 256 x 151,936.
    """
    packed = counts[slots]
    i, token = packed.nonzero(as_tuple=True)
    packed = packed[i, token]
    count = (packed & COUNT_MASK).to(logits.dtype)
    presence, frequency, repetition = params[slots[i]].unbind(-1)
    row = rows[i]
    x = logits[row, token]
    x = torch.where(x > 0, x / repetition, x * repetition)
    x = x - frequency * count
    x = x - presence * (count > 0).to(logits.dtype)
    logits[row, token] = x


@triton.jit
def _penalties_kernel(logits_ptr, rows_ptr, slots_ptr, counts_ptr, params_ptr, vocab,
                      stride_logits, stride_counts, BLOCK: tl.constexpr, PDL: tl.constexpr):
    await_previous_kernel(PDL)
    i = tl.program_id(0)
    ids = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = ids < vocab
    slot = tl.load(slots_ptr + i).to(tl.int64)
    presence = tl.load(params_ptr + slot * 3)
    frequency = tl.load(params_ptr + slot * 3 + 1)
    repetition = tl.load(params_ptr + slot * 3 + 2)
    packed = tl.load(counts_ptr + slot * stride_counts + ids, mask=mask, other=0)
    active = (presence != 0.0) | (frequency != 0.0) | (repetition != 1.0)
    # Packed entries are never negative: a zero maximum means no token of the block was seen.
    if active & (tl.max(packed, 0) > 0):
        row = tl.load(rows_ptr + i).to(tl.int64)
        pointers = logits_ptr + row * stride_logits + ids
        x = tl.load(pointers, mask=mask, other=0.0)
        count = (packed & COUNT_MASK_C).to(tl.float32)
        # Rounded division, as torch divides (Triton's `/` on fp32 is approximate).
        scaled = tl.where(x > 0, tl.math.div_rn(x, repetition), x * repetition)
        x = tl.where(packed != 0, scaled, x)
        x = x - frequency * count
        x = x - presence * (count > 0).to(tl.float32)
        tl.store(pointers, x, mask=mask)


def apply_penalties(logits: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                    counts: torch.Tensor, params: torch.Tensor) -> None:
    """apply_penalties_torch in one launch: a program per penalized row and vocabulary block.
    `logits` fp32 with unit stride over the vocabulary; `params` contiguous [S, 3] fp32."""
    num_rows = rows.shape[0]
    vocab = logits.shape[1]
    if num_rows == 0:
        return
    if logits.stride(-1) != 1 or counts.stride(-1) != 1 or not params.is_contiguous():
        raise ValueError("logits and counts need unit stride over the vocabulary")
    pdl = dependent_launch(logits.device)
    _penalties_kernel[(num_rows, triton.cdiv(vocab, BLOCK))](
        logits, rows, slots, counts, params, vocab, logits.stride(0), counts.stride(0),
        BLOCK=BLOCK, PDL=pdl, launch_pdl=pdl, num_warps=4)
