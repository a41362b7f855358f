"""Causal attention of new query tokens over a paged KV cache (decode and prefill/extend alike).

Layout: `k_cache`/`v_cache` are [num_blocks, block_size, num_kv_heads, head_dim]; sequence b owns
the pages `block_tables[b, :]`, holds `seq_lens[b]` tokens after this step, and its queries
`q[query_start_loc[b]:query_start_loc[b+1]]` are its last positions (causal inside the step).
An e4m3 cache comes with per-row scales [num_blocks, Hkv, block_size] (see fp8_kv).
"""

import torch


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Returns the first `length` tokens of one sequence's pages as [length, heads, head_dim]."""
    block_size = cache.shape[1]
    num_pages = (length + block_size - 1) // block_size
    pages = cache[block_table[:num_pages].long()]
    return pages.reshape(-1, *cache.shape[2:])[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            scale: float, kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> torch.Tensor:
    """q [B, Q, Hq, D], k/v [B, K, Hkv, D], mask [B, Q, K] (True = visible) -> [B, Q, Hq, D].

    With `kv_scales` ([B, K, Hkv] each) k and v are e4m3, dequantized as the Triton kernels
    do: the scores by K's scales, the probabilities by V's before P @ V.
    """
    batch, num_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    # GQA: query heads of one KV head sit next to each other (head h uses KV head h // group).
    qg = q.float().view(batch, num_q, num_kv_heads, group, head_dim)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.float()) * scale
    if kv_scales is not None:
        scores = scores * kv_scales[0].permute(0, 2, 1)[:, :, None, None]
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    # As the Triton kernels and flash attention do: the unnormalized probabilities are rounded
    # to v's dtype for P @ V (a no-op in fp32), the fp32 sum divides afterwards; e4m3 values
    # are widened to the products' dtype (fp16 for a bf16 q, see paged_common.fp8_query: a
    # bf16 q in fp16's range is exact there), and the probabilities scaled by V's scales
    # rounded to it.
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = probs.to(v.dtype)
    if kv_scales is not None:
        product_dtype = torch.float16 if q.dtype == torch.bfloat16 else q.dtype
        weights = (probs * kv_scales[1].permute(0, 2, 1)[:, :, None, None]).to(product_dtype)
    out = torch.einsum("bhgqk,bkhd->bhgqd", weights.float(), v.float())
    out = out / probs.sum(-1, keepdim=True)
    return out.permute(0, 3, 1, 2, 4).reshape(batch, num_q, num_heads, head_dim).to(q.dtype)


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reference paged attention: q [T, Hq, D] (flat varlen) -> [T, Hq, D].

    Single-token queries (decode) are batched into one padded computation; longer ones (prefill
    chunks) run one sequence at a time so padding never multiplies by the longest prompt.
    """
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decode_rows = [b for b in range(len(lens)) if starts[b + 1] - starts[b] == 1]
    # A row of seq_len 0 (padding, or a draft loop's row past its guesses) attends to nothing.
    out[[starts[b] for b in decode_rows if lens[b] == 0]] = 0
    decode_rows = [b for b in decode_rows if lens[b] > 0]
    device = q.device
    # K, V and (for e4m3) their scales, the scales viewed as pages [num_blocks, block_size, Hkv]
    caches = [k_cache, v_cache]
    if kv_scales is not None:
        caches += [s.transpose(1, 2) for s in kv_scales]
    if decode_rows:
        max_len = max(lens[b] for b in decode_rows)
        padded = [torch.zeros(len(decode_rows), max_len, *c.shape[2:], dtype=c.dtype,
                              device=device) for c in caches]
        for i, b in enumerate(decode_rows):
            for dense, cache in zip(padded, caches, strict=True):
                dense[i, : lens[b]] = gather_paged(cache, block_tables[b], lens[b])
        token_rows = torch.tensor([starts[b] for b in decode_rows], device=device)
        row_lens = torch.tensor([lens[b] for b in decode_rows], device=device)
        valid = torch.arange(max_len, device=device)[None, :] < row_lens[:, None]
        out[token_rows] = _attend(q[token_rows][:, None], padded[0], padded[1], valid[:, None],
                                  scale, _pair(padded[2:]))[:, 0]
    for b in range(len(lens)):
        num_q = starts[b + 1] - starts[b]
        if num_q <= 1:
            continue
        dense = [gather_paged(c, block_tables[b], lens[b])[None] for c in caches]
        q_pos = torch.arange(lens[b] - num_q, lens[b], device=device)
        mask = torch.arange(lens[b], device=device)[None, :] <= q_pos[:, None]
        out[starts[b] : starts[b + 1]] = _attend(
            q[starts[b] : starts[b + 1]][None], dense[0], dense[1], mask[None], scale,
            _pair(dense[2:])
        )[0]
    return out


def _pair(scales: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    return (scales[0], scales[1]) if scales else None
