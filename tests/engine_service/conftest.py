"""In-process engine fixtures: the demo checkpoint built into a temporary folder."""

from collections.abc import Callable
from pathlib import Path

import pytest

from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.engine_builder import build_engine
from llmserve.engine_service.core.engine_core import EngineCore
from llmserve.engine_service.demo_model import create_demo_model
from llmserve.engine_service.seam import EngineRequest, RequestOutput


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo")
    create_demo_model(path)
    return path


@pytest.fixture
def demo_core(demo_dir: Path) -> Callable[..., EngineCore]:
    """Builds an in-process engine core on the demo model with the given settings."""

    def make(**settings: object) -> EngineCore:
        core, _ = build_engine(EngineConfig(model=demo_dir, device="cpu", **settings))
        return core

    return make


def _run_all(core: EngineCore, requests: list[EngineRequest]) -> dict[str, list[RequestOutput]]:
    for request in requests:
        core.add_request(request)
    outputs: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
    while core.has_work:
        for out in core.step():
            outputs[out.request_id].append(out)
    return outputs


@pytest.fixture
def run_all() -> Callable[[EngineCore, list[EngineRequest]], dict[str, list[RequestOutput]]]:
    """Adds the requests and steps the core until every one has finished."""
    return _run_all
