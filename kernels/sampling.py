"""Keyed temperature sampling in one pass over the logits (the Gumbel-max form of the sampler's
exponential race).

The engine's sampler draws token argmax_i p_i / E_i, with p = softmax(logits / T) and
E_i = -log(u_i) for noise u keyed on (request seed, position, token id). Since p_i is
exp(l_i / T) over a constant, that is argmax_i l_i / T - log(E_i): no softmax, no sort, and the
kernels read the logits once, hashing the noise in registers with the sampler's own hash
(`keyed_uniform` in engine_service/sampler.py). For rows without top-k, top-p or min-p, and
temperature > 0.
"""

import torch
import triton
import triton.language as tl

# lowbias32's multipliers, as the sampler's _mix32 uses them.
MIX1: tl.constexpr = tl.constexpr(0x7FEB352D)
MIX2: tl.constexpr = tl.constexpr(0x846CA68B)
BLOCK = 1024  # vocabulary entries per loop iteration
SPLITS = 16  # programs per row


def gumbel_sample_torch(logits: torch.Tensor, temperature: torch.Tensor,
                        uniform: torch.Tensor) -> torch.Tensor:
    """logits [N, V], temperature [N] (> 0), keyed noise u [N, V] in (0, 1) -> tokens [N]."""
    scores = logits.double() / temperature.double()[:, None] - torch.log(-torch.log(uniform))
    return scores.argmax(dim=-1)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * MIX1
    x = x ^ (x >> 15)
    x = x * MIX2
    return x ^ (x >> 16)


@triton.jit
def _gumbel_kernel(logits_ptr, temperature_ptr, seeds_ptr, positions_ptr, best_ptr, best_id_ptr,
                   vocab, stride_row, span, BLOCK: tl.constexpr, SPLITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    seed = tl.load(seeds_ptr + row).to(tl.uint64, bitcast=True)
    position = tl.load(positions_ptr + row).to(tl.uint64, bitcast=True)
    key = _mix32((seed & 0xFFFFFFFF).to(tl.uint32))
    key = _mix32(key ^ (seed >> 32).to(tl.uint32))
    key = _mix32(key ^ (position & 0xFFFFFFFF).to(tl.uint32))
    temperature = tl.load(temperature_ptr + row).to(tl.float64)
    best = tl.full([BLOCK], float("-inf"), tl.float64)
    best_id = tl.zeros([BLOCK], tl.int32)
    lo = split * span
    for start in range(lo, tl.minimum(lo + span, vocab), BLOCK):
        ids = start + tl.arange(0, BLOCK)
        mask = ids < vocab
        logit = tl.load(logits_ptr + row * stride_row + ids, mask=mask, other=0.0)
        bits = _mix32(key ^ _mix32(ids.to(tl.uint32)))
        u = (bits.to(tl.float64) + 0.5) / 4294967296.0
        score = logit.to(tl.float64) / temperature - tl.log(-tl.log(u))
        score = tl.where(mask, score, float("-inf"))
        better = score > best  # strict: the lowest id wins a tie, as argmax does
        best = tl.where(better, score, best)
        best_id = tl.where(better, ids, best_id)
    top = tl.max(best, 0)
    tl.store(best_ptr + row * SPLITS + split, top)
    tl.store(best_id_ptr + row * SPLITS + split, tl.min(tl.where(best == top, best_id, vocab), 0))


@triton.jit
def _pick_kernel(best_ptr, best_id_ptr, out_ptr, vocab, SPLITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = row * SPLITS + tl.arange(0, SPLITS)
    best = tl.load(best_ptr + offs)
    top = tl.max(best, 0)
    winner = tl.min(tl.where(best == top, tl.load(best_id_ptr + offs), vocab), 0)
    tl.store(out_ptr + row, winner.to(tl.int64))


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                  positions: torch.Tensor, splits: int = SPLITS) -> torch.Tensor:
    """Tokens [N] int64 drawn from logits [N, V] at temperature [N] (> 0), keyed on seeds [N]
    (int64, a uint64 reinterpreted) and positions [N]: gumbel_sample_torch with the sampler's
    keyed_uniform noise, with no sync and no [N, V] temporaries.

    Each row's vocabulary is raced in `splits` parts (a power of two) by as many programs, and
    a second kernel picks each row's winner: one program per row would leave most SMs idle.
    """
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        if logits.stride(-1) != 1:
            raise ValueError("logits need unit stride over the vocabulary")
        span = triton.cdiv(triton.cdiv(vocab, splits), BLOCK) * BLOCK
        best = torch.empty(rows, splits, dtype=torch.float64, device=logits.device)
        best_id = torch.empty(rows, splits, dtype=torch.int32, device=logits.device)
        _gumbel_kernel[(rows, splits)](logits, temperature, seeds.to(torch.int64),
                                       positions.to(torch.int64), best, best_id, vocab,
                                       logits.stride(0), span, BLOCK=BLOCK, SPLITS=splits,
                                       num_warps=4)
        _pick_kernel[(rows,)](best, best_id, out, vocab, SPLITS=splits, num_warps=1)
    return out
