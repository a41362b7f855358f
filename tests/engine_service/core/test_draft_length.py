"""Draft lengths: as long as pays, from each sequence's kept guesses and a guess's cost."""

from llmserve.engine_service.core.draft_length import best_length, keep_rate


def test_free_guesses_take_the_longest_draft_and_dear_ones_the_shortest() -> None:
    for rate in (0.1, 0.5, 0.99):
        assert best_length(rate, 8, 0.0) == 8
        assert best_length(rate, 8, 50.0) == 1


def test_the_length_follows_the_keep_rate() -> None:
    # Gains per cost at rate 0.6, cost 0.15: 1.39 (k=1), 1.51 (k=2), 1.50 (k=3), falling.
    assert best_length(0.6, 8, 0.15) == 2
    # At 0.9 each longer draft still pays up to 8 guesses.
    assert best_length(0.9, 8, 0.15) == 8
    assert [best_length(r, 8, 0.15) for r in (0.3, 0.6, 0.75, 0.9)] == sorted(
        best_length(r, 8, 0.15) for r in (0.3, 0.6, 0.75, 0.9))


def test_keep_rate_starts_from_the_prior_and_follows_the_counts() -> None:
    assert keep_rate(0, 0) == 0.75
    assert keep_rate(97, 0) > 0.99
    assert abs(keep_rate(100, 100) - 0.5) < 0.01
