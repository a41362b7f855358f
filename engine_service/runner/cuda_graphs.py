"""CUDA graphs: the model's forward pass captured once per step size, then replayed.

A decode step of n sequences is padded to the smallest captured batch size >= n; a prefill or
mixed step of t tokens to the smallest captured token count >= t (the varlen graphs, which
hold up to min(t, max_num_seqs) sequences). Padding rows store nothing and attend to nothing,
and the graph replays on the runner's fixed-address inputs. Eagerly, a short prefill is bound
by kernel launches on the host: the GPU spends most of the step waiting for the next one.
Capturing is behind a small interface, so the padding and static-buffer logic also runs (and
is tested) on the CPU, where `eager_capture` re-runs the pass instead of replaying a graph.
"""

import bisect
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

Replay = Callable[[], torch.Tensor]
GraphCapture = Callable[[Callable[[], torch.Tensor]], Replay]


def graph_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to `max_bs`, which is always the last size."""
    if max_bs < 1:
        return []
    sizes = [s for s in (1, 2, 4) if s < max_bs] + list(range(8, max_bs + 1, 8))
    if not sizes or sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


def varlen_graph_sizes(max_tokens: int) -> list[int]:
    """Token counts for the varlen graphs: 16, 32, 64, 128, then every 128 to 1024, then every
    256; `max_tokens` is always the last size."""
    if max_tokens < 1:
        return []
    ladder = [16, 32, 64, *range(128, 1024, 128), *range(1024, max_tokens, 256)]
    return [s for s in ladder if s < max_tokens] + [max_tokens]


def padded_batch_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest size in (sorted) `sizes` that holds `num_seqs` rows; None if none does."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


class CudaGraphCapture:
    """Captures callables into CUDA graphs that share one memory pool.

    Graphs are captured largest first, so the smaller ones reuse the largest one's memory for
    their intermediates; only each graph's output stays allocated.
    """

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, run: Callable[[], torch.Tensor]) -> Replay:
        # One eager run first: Triton compiles its kernels and libraries allocate their
        # workspaces outside the graph.
        run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = run()
        # The first replay of a graph uploads it to the device, which is slow: done here, on
        # the padding batch it was captured on, not in the middle of serving, where the first
        # step at each new padded batch size would be late.
        graph.replay()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


def eager_capture(run: Callable[[], torch.Tensor]) -> Replay:
    """The CPU stand-in for CudaGraphCapture: a replay runs the pass again on the same buffers."""
    return run


class StepGraphs:
    """One replayable forward pass per step size (decode rows, or varlen tokens).

    `prepare(size)` returns the pass over the first rows of the static input buffers (its
    output: hidden states [size, hidden]); `capture` turns it into a replay.
    """

    def __init__(self, sizes: list[int], prepare: Callable[[int], Callable[[], torch.Tensor]],
                 capture: GraphCapture, what: str, progress: bool = True) -> None:
        self.sizes = sorted(sizes)
        self._replays: dict[int, Replay] = {}
        # disable=None: no bar unless stderr is a terminal, so JSON logs stay one event a line.
        for size in tqdm(sorted(self.sizes, reverse=True), desc=f"Capturing {what} graphs",
                         disable=None if progress else True, dynamic_ncols=True):
            self._replays[size] = capture(prepare(size))

    def padded_size(self, size: int) -> int | None:
        return padded_batch_size(size, self.sizes)

    def replay(self, padded_size: int) -> torch.Tensor:
        """Runs the pass captured for `padded_size`; returns its hidden states."""
        return self._replays[padded_size]()
