"""Where a timed generation's wall time went, by kind of step: prefill only, mixed (prefill and
decode rows together), and decode by batch size.

The timeline wraps the model runner's `execute` and stamps each step's start on the host; a
step lasts until the next one starts (the last until the run ends). With async scheduling the
host launches a step while the one before it runs, so in steady state the host's cadence is the
GPU's; a synchronous run's steps include their host work. Stamping costs a clock read a step.
"""

import time
from collections.abc import Callable
from types import TracebackType

from llmserve.engine_service.llm import LLM


def _batch_bucket(rows: int) -> str:
    """Decode batch sizes in powers of two: 1, 2, 3-4, 5-8, ..., 129-256."""
    return f"decode_{1 << (rows - 1).bit_length()}"


class StepTimeline:
    """Records each step's start, prefill tokens and decode rows while active."""

    def __init__(self, llm: LLM) -> None:
        self.runner = llm.core.runner
        self.steps: list[tuple[float, int, int]] = []

    def __enter__(self) -> "StepTimeline":
        execute: Callable = self.runner.execute
        steps = self.steps

        def stamped(chunks, *args, **kwargs):
            prefill = sum(c.num_tokens for c in chunks if c.num_tokens > 1)
            steps.append((time.perf_counter(), prefill, sum(c.num_tokens == 1 for c in chunks)))
            return execute(chunks, *args, **kwargs)

        self.runner.execute = stamped
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        del self.runner.execute

    def summary(self, started: float, ended: float) -> dict:
        """Seconds, steps, prefill tokens and decode rows per kind of step, for the run from
        `started` to `ended` (perf_counter times); before the first step is the host's own."""
        kinds: dict[str, dict] = {}
        for i, (stamp, prefill, rows) in enumerate(self.steps):
            until = self.steps[i + 1][0] if i + 1 < len(self.steps) else ended
            kind = ("prefill" if not rows else "mixed") if prefill else _batch_bucket(rows)
            k = kinds.setdefault(kind, {"steps": 0, "s": 0.0, "prefill_tokens": 0,
                                        "decode_rows": 0})
            k["steps"] += 1
            k["s"] += until - stamp
            k["prefill_tokens"] += prefill
            k["decode_rows"] += rows
        for k in kinds.values():
            k["ms_per_step"] = round(k["s"] / k["steps"] * 1e3, 3)
            k["s"] = round(k["s"], 3)
        first = self.steps[0][0] if self.steps else ended
        return {"before_first_step_s": round(first - started, 4), "steps": len(self.steps),
                "by_kind": dict(sorted(kinds.items(), key=lambda kv: _order(kv[0])))}


def _order(kind: str) -> tuple[int, int]:
    return (0, 0) if kind == "prefill" else (1, 0) if kind == "mixed" else (
        2, int(kind.removeprefix("decode_")))
