"""How many tokens a sequence's next draft proposes: the length with the most tokens per unit of
step cost, from how often the target has kept the sequence's guesses so far.

Guesses are kept in order until the first miss; if each is kept with probability p (once those
before it were), a draft of k gains 1 + p + ... + p^k tokens, and the step verifying it costs
1 + k * c, c being one guess's cost relative to the verifying step (a draft model's pass; 0 for
a lookup, whose only cost is the verified rows). A draft model whose guesses a sequence keeps
less often gets shorter drafts for it, so speculation never costs it much more than it gains.
"""

# Pseudo-counts before a sequence's first verification: three kept guesses, one miss.
PRIOR_KEPT, PRIOR_MISSED = 3, 1


def keep_rate(kept: int, missed: int) -> float:
    """The estimated chance a guess is kept once those before it were: kept guesses over kept
    guesses and misses (each draft ends with at most one)."""
    return (kept + PRIOR_KEPT) / (kept + missed + PRIOR_KEPT + PRIOR_MISSED)


def best_length(rate: float, most: int, cost: float) -> int:
    """The draft length in 1..most with the most expected tokens per step cost."""
    best, best_value = 1, 0.0
    expected, power = 1.0, 1.0
    for k in range(1, most + 1):
        power *= rate
        expected += power
        value = expected / (1.0 + k * cost)
        if value > best_value:
            best, best_value = k, value
    return best
