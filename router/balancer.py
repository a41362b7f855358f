"""Picks the engine for a request: lowest estimated time to first token, or a simple policy.

The estimate is in tokens of prefill work: the prompt tokens the engine would have to compute
(those not in its prefix cache) plus the prefill work already queued there, plus a charge per
running sequence (each makes every step slower). A hot prefix thus spreads by itself: once the
engine holding it is busier than recomputing the prefix elsewhere, the next request goes
elsewhere, and that engine caches the prefix too.
"""

import random
from dataclasses import dataclass

from llmserve.router.config import Policy
from llmserve.router.engine_pool import Engine

# Prefill-token equivalent of one running sequence's share of each step.
RUNNING_SEQUENCE_COST = 16


@dataclass(frozen=True)
class Decision:
    """Where a request goes and why."""

    engine: Engine
    matched_blocks: int
    score: float


class Balancer:
    """Chooses among ready engines by the configured policy."""

    def __init__(self, policy: Policy, seed: int = 0) -> None:
        self.policy = policy
        self._turn = 0
        self._random = random.Random(seed)

    def pick(
        self,
        engines: list[Engine],
        matched: dict[str, int],
        num_prompt_tokens: int,
        block_size: int,
        cache_sizes: dict[str, int],
    ) -> Decision:
        """`matched`: leading prompt blocks each engine holds; `cache_sizes`: blocks it holds.

        Equal estimates go to the engine holding the fewest blocks, so new prefixes spread
        over the pool's cache; the final tie-break is the address, the same in every replica.
        """
        engines = sorted(engines, key=lambda e: e.address)  # same order in every replica
        if self.policy is Policy.ROUND_ROBIN:
            self._turn += 1
            engine = engines[self._turn % len(engines)]
            return Decision(engine, matched.get(engine.address, 0), 0.0)
        if self.policy is Policy.RANDOM:
            engine = self._random.choice(engines)
            return Decision(engine, matched.get(engine.address, 0), 0.0)
        scored = []
        for engine in engines:
            blocks = matched.get(engine.address, 0) if self.policy is Policy.PREFIX else 0
            uncached = max(num_prompt_tokens - blocks * block_size, 1)
            load = engine.queued_prefill_tokens() + RUNNING_SEQUENCE_COST * engine.num_running()
            score = load if self.policy is Policy.LEAST_LOAD else uncached + load
            scored.append(
                (score, cache_sizes.get(engine.address, 0), engine.address, engine, blocks)
            )
        score, _, _, engine, blocks = min(scored, key=lambda s: s[:3])
        return Decision(engine, blocks, float(score))
