"""Shared fixtures: tiny real checkpoints, engine cores built on them in this process, and real
engine/router processes on loopback ports."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from launcher import ServerProcess
from launcher import start_engine as launch_engine
from launcher import start_router as launch_router

from llmserve.common.ports import ephemeral_port
from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.engine_builder import build_engine
from llmserve.engine_service.core.engine_core import EngineCore
from llmserve.engine_service.demo_model import build_tokenizer, write_tokenizer
from llmserve.engine_service.seam import EngineRequest, SamplingOptions


@pytest.fixture
def unused_port() -> Callable[[], int]:
    """Returns a function that finds a free loopback port."""
    return ephemeral_port


@pytest.fixture(scope="session")
def start_engine(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ServerProcess]]:
    """Starts real engine processes; all are stopped at the end of the session."""
    started: list[ServerProcess] = []

    def start(model_dir: Path, *extra: str) -> ServerProcess:
        server = launch_engine(
            model_dir, tmp_path_factory.mktemp("engine"), "--num-kv-blocks", "512", *extra
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def start_router(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ServerProcess]]:
    """Starts real router processes in front of the given engines."""
    started: list[ServerProcess] = []

    def start(model_dir: Path, engines: list[ServerProcess], *extra: str) -> ServerProcess:
        server = launch_router(model_dir, engines, tmp_path_factory.mktemp("router"), *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    initializer_range=0.2,
    tie_word_embeddings=False,
)


def write_tiny_checkpoint(architecture: str, out_dir: Path) -> Path:
    """A random-weight Hugging Face checkpoint saved by transformers itself, plus our tokenizer."""
    import transformers

    tokenizer = build_tokenizer()
    im_end = tokenizer.token_to_id("<|im_end|>")
    config_cls, model_cls = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[architecture]
    extra = {"head_dim": 16} if architecture == "qwen3" else {}
    config = config_cls(
        vocab_size=tokenizer.get_vocab_size(),
        eos_token_id=im_end,
        bos_token_id=None,
        pad_token_id=tokenizer.token_to_id("<|endoftext|>"),
        **TINY_SHAPE,
        **extra,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.save_pretrained(out_dir)
    write_tokenizer(tokenizer, out_dir, TINY_SHAPE["max_position_embeddings"])
    return out_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Returns (and caches) a tiny checkpoint directory for 'qwen3', 'qwen2' or 'llama'."""
    made: dict[str, Path] = {}

    def get(architecture: str) -> Path:
        if architecture not in made:
            made[architecture] = write_tiny_checkpoint(
                architecture, tmp_path_factory.mktemp(f"tiny-{architecture}")
            )
        return made[architecture]

    return get


@pytest.fixture(scope="session")
def qwen3_system(
    tiny_checkpoint: Callable[[str], Path],
    start_engine: Callable[..., ServerProcess],
    start_router: Callable[..., ServerProcess],
) -> tuple[Path, ServerProcess, ServerProcess]:
    """One engine and one router on the tiny Qwen3 checkpoint, shared by the session."""
    model_dir = tiny_checkpoint("qwen3")
    engine = start_engine(model_dir)
    router = start_router(model_dir, [engine])
    return model_dir, engine, router


# Odd lengths, one shorter than a block, several blocks; 5 sequences pad to a graph of 8.
PROMPTS = [[5, 17, 99, 230, 7], [400, 12], list(range(40, 77)), [3] * 20, [9, 8, 7] * 11]


def _make_core(model_dir: Path, **settings: object) -> EngineCore:
    # A small token budget chunks the prompts across steps with several sequences batched, so
    # mixed steps run the prefill path and the rest replay decode graphs (sizes 1-8).
    config = {"num_kv_blocks": 512, "max_num_batched_tokens": 16, "max_num_seqs": 8,
              "cuda_graph_max_bs": 8, **settings}
    core, _ = build_engine(EngineConfig(model=model_dir, **config))
    return core


def _greedy(core: EngineCore, prompts: list[list[int]], new_tokens: int,
            ignore_eos: bool = False) -> list[list[int]]:
    """Every prompt's greedy tokens, all run together through the core's step loop (stopping
    at the checkpoint's end-of-sequence tokens, as transformers' generate does, unless told)."""
    options = SamplingOptions(temperature=0.0, max_tokens=new_tokens, ignore_eos=ignore_eos)
    requests = [EngineRequest(f"g{i}", prompt, options) for i, prompt in enumerate(prompts)]
    results = core.run_to_completion(requests)
    return [results[request.request_id].token_ids for request in requests]


def _teacher_forced(core: EngineCore, prompts: list[list[int]],
                    forced: list[list[int]]) -> list[torch.Tensor]:
    """Our logits [n, vocab] at every position of prompt + forced tokens, computed through the
    scheduler and runner exactly as generation does, but appending the given tokens."""
    options = SamplingOptions(temperature=0.0, max_tokens=max(map(len, forced)), ignore_eos=True)
    for i, prompt in enumerate(prompts):
        core.add_request(EngineRequest(f"t{i}", prompt, options))
    rows: dict[str, list[torch.Tensor]] = {f"t{i}": [] for i in range(len(prompts))}
    while core.has_work:
        plan = core.scheduler.schedule()
        logits, _ = core.runner.execute(plan.chunks)
        for chunk in plan.chunks:
            core.scheduler.commit(chunk)
        for chunk, row in zip([c for c in plan.chunks if c.samples], logits, strict=True):
            seq = chunk.seq
            index = int(seq.request_id[1:])
            done = rows[seq.request_id]
            done.append(row.float().cpu())
            if len(done) < len(forced[index]):
                seq.token_ids.append(forced[index][len(done) - 1])
            else:
                core.scheduler.finish(seq)
                del core.sequences[seq.request_id]
    return [torch.stack(rows[f"t{i}"]) for i in range(len(prompts))]


@pytest.fixture
def make_core() -> Callable[..., EngineCore]:
    """Builds an engine core on a checkpoint with the given EngineConfig settings."""
    return _make_core


@pytest.fixture
def greedy() -> Callable[..., list[list[int]]]:
    return _greedy


@pytest.fixture
def teacher_forced() -> Callable[..., list[torch.Tensor]]:
    return _teacher_forced


@pytest.fixture
def prompts() -> list[list[int]]:
    return [list(p) for p in PROMPTS]


def _engine_dies_cleanly(engine: ServerProcess, victim_event: str) -> dict:
    """Kills the process that logged `victim_event` (its `pid`) while a stream runs, and checks
    the engine ends cleanly: the stream gets UNAVAILABLE, a health watcher sees SERVING then
    NOT_SERVING, the engine exits non-zero within seconds. Returns the victim's log event."""
    import contextlib
    import os
    import signal
    import threading
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc

    (victim,) = [e for e in engine.log_events() if e.get("event") == victim_event]
    with grpc.insecure_channel(engine.address) as channel:
        statuses: list[int] = []
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())

        def follow_health() -> None:
            with contextlib.suppress(grpc.RpcError):
                statuses.extend(update.status for update in watch)

        watcher = threading.Thread(target=follow_health, daemon=True)
        watcher.start()
        call = engine_service_pb2_grpc.EngineServiceStub(channel).Generate(
            engine_service_pb2.EngineServiceGenerateRequest(
                prompt_token_ids=[7, 8, 9],
                sampling=common_pb2.SamplingParams(temperature=0.0),
                stopping=common_pb2.StoppingCriteria(max_tokens=400, ignore_eos=True),
            ),
            timeout=60,
        )
        next(call)
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as ended:
            list(call)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert engine.process.wait(timeout=20) != 0
        assert time.monotonic() - killed_at < 10
        watcher.join(timeout=5)
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    return victim


@pytest.fixture
def engine_dies_cleanly() -> Callable[[ServerProcess, str], dict]:
    """See `_engine_dies_cleanly`: kill one of an engine's processes, check the clean end."""
    return _engine_dies_cleanly
