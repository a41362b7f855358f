"""In-process engine fixtures: the demo checkpoint built into a temporary folder."""

from collections.abc import Callable
from pathlib import Path

import pytest

from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.engine_builder import build_engine
from llmserve.engine_service.core.engine_core import EngineCore
from llmserve.engine_service.demo_model import create_demo_model


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

