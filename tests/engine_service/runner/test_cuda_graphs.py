"""The CUDA-graph logic without a GPU: the ladder of captured sizes, padding to them, and the
graph path end to end with the CPU stand-in for capture."""

from llmserve.engine_service.runner.cuda_graphs import (
    graph_batch_sizes,
    padded_batch_size,
    varlen_graph_sizes,
)


def test_graph_ladder_and_padding() -> None:
    sizes = graph_batch_sizes(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 256 and len(sizes) == 35
    assert graph_batch_sizes(100)[-2:] == [96, 100]
    assert graph_batch_sizes(3) == [1, 2, 3] and graph_batch_sizes(1) == [1]
    assert [padded_batch_size(n, sizes) for n in (1, 3, 5, 9, 250, 256)] == [
        1, 4, 8, 16, 256, 256]
    assert padded_batch_size(257, sizes) is None
    varlen = varlen_graph_sizes(2048)
    assert varlen[:6] == [16, 32, 64, 128, 256, 384] and varlen[-3:] == [1536, 1792, 2048]
    assert varlen_graph_sizes(100) == [16, 32, 64, 100] and varlen_graph_sizes(0) == []
    assert padded_batch_size(513, varlen) == 640


def test_graph_path_on_cpu_equals_eager(tiny_checkpoint, make_core, greedy, prompts) -> None:
    """The graph path (padding, static buffers, replay) with the CPU stand-in for capture."""
    model_dir = tiny_checkpoint("qwen3")
    eager = greedy(make_core(model_dir, device="cpu"), prompts, 10, True)
    core = make_core(model_dir, device="cpu")
    replays: list[int] = []

    def counting_capture(run):
        def replay():
            replays.append(1)
            return run()
        return replay

    # The prompts (87 tokens) go through a 16-token budget: every prefill/mixed step replays
    # a varlen graph of 16 tokens in 8 rows, every decode step a padded decode graph.
    core.runner.capture_graphs(graph_batch_sizes(8), varlen_graph_sizes(16), counting_capture,
                               progress=False)
    assert greedy(core, prompts, 10, True) == eager
    assert len(replays) >= 6 + 9
    assert core.runner.graphs is not None and core.runner.graphs.padded_size(5) == 8
    assert core.runner.varlen_graphs is not None and core.runner.varlen_graphs.sizes == [16]
