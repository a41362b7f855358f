"""A step's first tokens reach their readers before running streams' next ones (both tiers)."""

import operator

from llmserve.common.stream_order import first_tokens_first

STREAM = operator.itemgetter(0)


def _items(*streams: int) -> list[tuple[int, int]]:
    return [(stream, 100 + stream) for stream in streams]


def test_unanswered_streams_go_first_in_their_own_order() -> None:
    unanswered = {4, 2, 9}
    items = first_tokens_first(_items(1, 2, 3, 4, 5), unanswered, STREAM)
    assert list(items) == _items(2, 4, 1, 3, 5)
    assert unanswered == {9}  # answered streams leave the set; 9 is still waiting


def test_nothing_moves_once_every_stream_was_answered() -> None:
    items = _items(3, 1, 2)
    unanswered = {1}
    assert [STREAM(i) for i in first_tokens_first(items, unanswered, STREAM)] == [1, 3, 2]
    assert first_tokens_first(items, unanswered, STREAM) is items
    assert unanswered == set()


def test_items_of_one_kind_keep_their_order() -> None:
    running = _items(1, 2)
    assert first_tokens_first(running, {7}, STREAM) is running
    new = _items(3, 4)
    unanswered = {3, 4}
    assert list(first_tokens_first(new, unanswered, STREAM)) == new
    assert unanswered == set()
