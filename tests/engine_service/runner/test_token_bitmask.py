"""Structured output's masks on the logits: exactly the forbidden tokens become -inf, in the
rows that have a mask; the host (numpy) and device (torch) unpackings agree bit for bit."""

import numpy as np
import pytest
import torch

from llmserve.engine_service.runner.token_bitmask import (
    GrammarBitmask,
    apply_token_bitmask,
    forbidden_on_device,
    forbidden_tokens,
)

VOCAB = 1000  # not a multiple of 32: the last word's high bits lie past the vocabulary


def random_bitmask(rows: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    allowed = rng.random((rows, VOCAB)) < 0.1
    padded = np.zeros((rows, 32 * ((VOCAB + 31) // 32)), dtype=bool)
    padded[:, :VOCAB] = allowed
    words = np.packbits(padded, axis=1, bitorder="little").view(np.int32)
    return torch.from_numpy(words.copy()), allowed


def test_both_unpackings_agree_with_the_bits() -> None:
    bitmask, allowed = random_bitmask(5)
    host = forbidden_tokens(bitmask, VOCAB, torch.device("cpu"))
    device_path = forbidden_on_device(bitmask, VOCAB)
    assert torch.equal(host, torch.from_numpy(~allowed))
    assert torch.equal(device_path, host)


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [1, 3]], ids=["all rows", "some rows"])
def test_forbidden_logits_become_minus_infinity_in_masked_rows_only(rows: list[int]) -> None:
    logits = torch.randn(4, VOCAB)
    before = logits.clone()
    bitmask, allowed = random_bitmask(len(rows), seed=1)
    apply_token_bitmask(logits, bitmask, rows)
    for i, row in enumerate(rows):
        keep = torch.from_numpy(allowed[i])
        assert torch.equal(logits[row][keep], before[row][keep])
        assert torch.isneginf(logits[row][~keep]).all()
    for row in set(range(4)) - set(rows):
        assert torch.equal(logits[row], before[row])


def test_a_copy_leaves_the_models_logits_alone() -> None:
    with torch.inference_mode():  # as the runner makes them
        logits = torch.randn(2, VOCAB)
    bitmask, _ = random_bitmask(1)
    masked = GrammarBitmask(bitmask, [1]).apply(logits, copy=True)
    assert not torch.isinf(logits).any() and torch.isinf(masked[1]).any()
    assert GrammarBitmask(bitmask, [1]).apply(logits, copy=False) is logits
    assert torch.isinf(logits[1]).any()
