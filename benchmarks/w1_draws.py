"""W1's prompt and length draws (docs/benchmarks.md), shared by W1, W2, W5 and W7; no torch."""

from random import randint, seed

TOTAL_MAX_TOKENS = 133966


def w1_requests() -> tuple[list[list[int]], list[int]]:
    """W1's prompts and max_tokens, drawn exactly as docs/benchmarks.md defines them."""
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(100, 1024))] for _ in range(256)]
    max_tokens = [randint(100, 1024) for _ in range(256)]  # drawn after all prompts
    assert sum(max_tokens) == TOTAL_MAX_TOKENS
    return prompts, max_tokens


def warmup_prompts(vocab_size: int) -> list[list[int]]:
    """Two 64-token prompts of ids W1 never draws (above 10000), so the warm-up leaves nothing
    in the prefix cache that W1's prompts could hit."""
    return [[(10001 + 64 * i + j) % vocab_size for j in range(64)] for i in range(2)]


def fold_into_vocab(prompts: list[list[int]], vocab_size: int) -> list[list[int]]:
    """W1's ids (0..10000) folded into a small smoke-test model's vocabulary; unchanged when
    they fit."""
    if vocab_size > 10000:
        return prompts
    return [[t % vocab_size for t in p] for p in prompts]


def salted(prompts: list[list[int]], run: int, vocab: int) -> list[list[int]]:
    """Run `run`'s prompts: the first token shifted by `run`, so no earlier run's cache hits."""
    return [[(p[0] + run) % vocab, *p[1:]] for p in prompts]
