"""Keyed temperature sampling in one pass over the logits (the Gumbel-max form of the sampler's
exponential race).

The engine's sampler draws token argmax_i p_i / E_i, with p = softmax(logits / T) and
E_i = -log(u_i) for noise u keyed on (request seed, position, token id). Since p_i is
exp(l_i / T) over a constant, that is argmax_i l_i / T - log(E_i): no softmax, no sort, and the
kernels read the logits once, hashing the noise in registers with the sampler's own hash
(`keyed_uniform` in engine_service/runner/sampler.py). For rows without top-k, top-p or min-p, and
temperature > 0.

The twin scores in fp64 and the kernel draws exactly its tokens, but scoring every entry in fp64
(two accurate logs each) is what made the race slow. So the kernel scores every entry once in
fp32 with hardware logs, keeping each lane's best two, and computes the fp64 score only for the
few entries within fp32's error of the best.
"""

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from llmserve.kernels.dependent_launch import await_previous_kernel, dependent_launch

# lowbias32's multipliers, as the sampler's _mix32 uses them.
MIX1: tl.constexpr = tl.constexpr(0x7FEB352D)
MIX2: tl.constexpr = tl.constexpr(0x846CA68B)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
TWO_POW_M32: tl.constexpr = tl.constexpr(2.3283064365386963e-10)
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
def _row_key(seeds_ptr, positions_ptr, row):
    seed = tl.load(seeds_ptr + row).to(tl.uint64, bitcast=True)
    position = tl.load(positions_ptr + row).to(tl.uint64, bitcast=True)
    key = _mix32((seed & 0xFFFFFFFF).to(tl.uint32))
    key = _mix32(key ^ (seed >> 32).to(tl.uint32))
    return _mix32(key ^ (position & 0xFFFFFFFF).to(tl.uint32))


@triton.jit
def _log2_32(x, FAST_LOG: tl.constexpr):
    # The interpreter has no hardware log; both are within 2^-22 of log2 where we use them.
    if FAST_LOG:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _score32(logit, bits, inv_temperature, FAST_LOG: tl.constexpr):
    """The race's score l / T - log(E) in fp32, E = -log(u), u = (bits + 0.5) / 2^32: within
    2e-5 + 3e-7 (|score| + 24) of the fp64 score."""
    u = (bits.to(tl.float32) + 0.5) * TWO_POW_M32
    # For u >= 1/2, E from v = 1 - u (the bits' complement, exact): u itself rounds to 1
    # near the top, where E -> 0 decides the race. Below 2^-6, E's series to v^4.
    v = ((~bits).to(tl.float32) + 0.5) * TWO_POW_M32
    series = v * (1.0 + v * (0.5 + v * (0.3333333333333333 + v * 0.25)))
    e = -LN2 * _log2_32(u, FAST_LOG)
    e = tl.where((bits >= 0x80000000) & (v < 0.015625), series, e)
    return logit.to(tl.float32) * inv_temperature - LN2 * _log2_32(e, FAST_LOG)


@triton.jit
def _margin(top):
    """Over twice _score32's error bound near `top`: no entry whose fp64 score could be the
    largest scores below the fp32 maximum minus this."""
    return 2.5e-4 + (tl.abs(top) + 24.0) * 1e-6


@triton.jit
def _score64(logit, ids, key, temperature):
    """The twin's score, in fp64 as it computes it."""
    bits = _mix32(key ^ _mix32(ids.to(tl.uint32)))
    u = (bits.to(tl.float64) + 0.5) / 4294967296.0
    return logit.to(tl.float64) / temperature - tl.log(-tl.log(u))


@triton.jit
def _gumbel_kernel(logits_ptr, temperature_ptr, seeds_ptr, positions_ptr, best_ptr, best_id_ptr,
                   vocab, stride_row, span, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
                   FAST_LOG: tl.constexpr, PDL: tl.constexpr):
    await_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    key = _row_key(seeds_ptr, positions_ptr, row)
    temperature = tl.load(temperature_ptr + row).to(tl.float64)
    inv_temperature = 1.0 / temperature.to(tl.float32)
    row_ptr = logits_ptr + row * stride_row
    lo = split * span
    hi = tl.minimum(lo + span, vocab)
    # Each lane's best and second-best fp32 score, and the best one's id.
    first = tl.full([BLOCK], float("-inf"), tl.float32)
    second = tl.full([BLOCK], float("-inf"), tl.float32)
    first_id = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, hi, BLOCK):
        ids = start + tl.arange(0, BLOCK)
        mask = ids < vocab
        logit = tl.load(row_ptr + ids, mask=mask, other=0.0)
        bits = _mix32(key ^ _mix32(ids.to(tl.uint32)))
        score = tl.where(mask, _score32(logit, bits, inv_temperature, FAST_LOG), float("-inf"))
        better = score > first
        second = tl.where(better, first, tl.maximum(second, score))
        first_id = tl.where(better, ids, first_id)
        first = tl.maximum(first, score)
    top = tl.max(first, 0)
    threshold = top - _margin(top)
    best = tl.full([BLOCK], float("-inf"), tl.float64)
    best_id = tl.zeros([BLOCK], tl.int32)
    if tl.max(second, 0) >= threshold:
        # Rare: two contenders share a lane, so the lane bests do not hold every contender.
        # Race the whole part in fp64, as the twin does.
        for start in range(lo, hi, BLOCK):
            ids = start + tl.arange(0, BLOCK)
            mask = ids < vocab
            logit = tl.load(row_ptr + ids, mask=mask, other=0.0)
            score = tl.where(mask, _score64(logit, ids, key, temperature), float("-inf"))
            better = score > best  # strict: the lowest id wins a tie, as argmax does
            best = tl.where(better, score, best)
            best_id = tl.where(better, ids, best_id)
    else:
        contender = first >= threshold
        logit = tl.load(row_ptr + first_id, mask=contender, other=0.0)
        best = tl.where(contender, _score64(logit, first_id, key, temperature), float("-inf"))
        best_id = first_id
    top64 = tl.max(best, 0)
    tl.store(best_ptr + row * SPLITS + split, top64)
    tl.store(best_id_ptr + row * SPLITS + split,
             tl.min(tl.where(best == top64, best_id, vocab), 0))


@triton.jit
def _pick_kernel(best_ptr, best_id_ptr, out_ptr, vocab, SPLITS: tl.constexpr,
                 PDL: tl.constexpr):
    await_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = row * SPLITS + tl.arange(0, SPLITS)
    best = tl.load(best_ptr + offs)
    top = tl.max(best, 0)
    winner = tl.min(tl.where(best == top, tl.load(best_id_ptr + offs), vocab), 0)
    tl.store(out_ptr + row, winner.to(tl.int64))


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                  positions: torch.Tensor, splits: int = SPLITS) -> torch.Tensor:
    """Tokens [N] int64 drawn from logits [N, V] at temperature [N] (>= the engine's
    MIN_TEMPERATURE: colder requests are greedy before they get here), keyed on seeds [N]
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
        fast_log = os.environ.get("TRITON_INTERPRET") != "1"
        pdl = dependent_launch(logits.device)
        _gumbel_kernel[(rows, splits)](logits, temperature, seeds.to(torch.int64),
                                       positions.to(torch.int64), best, best_id, vocab,
                                       logits.stride(0), span, BLOCK=BLOCK, SPLITS=splits,
                                       FAST_LOG=fast_log, PDL=pdl, launch_pdl=pdl, num_warps=4)
        _pick_kernel[(rows,)](best, best_id, out, vocab, SPLITS=splits, PDL=pdl, launch_pdl=pdl,
                              num_warps=1)
    return out
