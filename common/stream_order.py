"""The order in which a step's outputs reach their streams' readers, the same in both tiers: the
engine's frontend hands a step's outputs to their streams, the router an engine message's updates
to its readers; and how a stream's queued items split by sample before they are merged."""

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

Item = TypeVar("Item")
Key = TypeVar("Key")


class OfSample(Protocol):
    index: int  # the sample (0 to n - 1) an output or response belongs to


Sampled = TypeVar("Sampled", bound=OfSample)


def by_sample(items: list[Sampled]) -> list[list[Sampled]]:
    """A stream's queued items split by sample, in the order each sample first appears: a
    merged response holds the tokens of one sample only."""
    if not items:
        return []
    first = items[0].index
    if all(item.index == first for item in items):
        return [items]  # the rule: one item, or one sample's
    samples: dict[int, list[Sampled]] = {}
    for item in items:
        samples.setdefault(item.index, []).append(item)
    return list(samples.values())


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
