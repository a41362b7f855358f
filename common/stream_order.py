"""The order in which a step's outputs reach their streams' readers, the same in both tiers: the
engine's frontend hands a step's outputs to their streams, the router an engine message's updates
to its readers."""

from collections.abc import Callable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Key = TypeVar("Key")


def first_tokens_first(
    items: Sequence[Item], unanswered: set[Key], key: Callable[[Item], Key]
) -> Sequence[Item]:
    """`items` with those of `unanswered` streams in front, each part in its own order; those
    streams leave the set. `key` gives an item's stream.

    Readers wake in the order their items are handed over, and each relays its response before
    the next one runs, so a new stream's first token would otherwise wait behind every running
    stream's next token. A caller waits on its first token; the running streams lose a fraction
    of that on one of theirs.
    """
    if not unanswered:
        return items  # the steady state: every stream has had its first token
    keys = list(map(key, items))
    first = unanswered.intersection(keys)
    if not first:
        return items
    unanswered -= first
    front: list[Item] = []
    rest: list[Item] = []
    for item, item_key in zip(items, keys, strict=True):
        (front if item_key in first else rest).append(item)
    return front + rest
