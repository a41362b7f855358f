"""The servers' configs: every flag is a config field, a value out of bounds stops start-up at
once naming its flag, and docs/configuration.md is what the configs generate."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmserve.common.config_flags import flag_name, from_json_fields
from llmserve.engine_service.config import EngineConfig
from llmserve.router.config import RouterConfig

ROOT = Path(__file__).resolve().parents[1]
CLIS = {"llmserve.engine_service": EngineConfig, "llmserve.router": RouterConfig}


def run_cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # cwd is a scratch folder so the repository's top-level folders never shadow packages; wide
    # columns so that help never wraps a flag's name at its hyphens.
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "1000"})


def test_docs_configuration_md_is_what_the_configs_generate() -> None:
    result = subprocess.run([sys.executable, "scripts/config_docs.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", CLIS)
def test_every_flag_is_a_config_field_and_every_flag_field_a_flag(
    module: str, tmp_path: Path
) -> None:
    result = run_cli(module, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", result.stdout))
    expected = {"-h", "--help"}
    for field in dataclasses.fields(CLIS[module]):
        setting = field.metadata["setting"]
        if not setting.flag:
            continue
        expected |= {flag_name(field), *setting.aliases}
        if field.type in (bool, bool | None):
            expected.add("--no-" + flag_name(field)[2:])
    # Help texts mention other flags (--max-num-seqs in --cuda-graph-max-bs's), never unknown ones.
    assert shown == expected


def test_test_and_benchmark_settings_are_not_engine_flags(tmp_path: Path) -> None:
    for flag in ("--test-reported-hash-seed", "--distributed", "--block-hash-seed"):
        result = run_cli("llmserve.engine_service", flag, cwd=tmp_path)
        assert result.returncode == 2 and "unrecognized arguments" in result.stderr, flag


@pytest.mark.parametrize(("module", "flag", "value", "limit"), [
    ("llmserve.engine_service", "--max-num-seqs", "0", "[1, 2147483647]"),
    ("llmserve.engine_service", "--max-num-batched-tokens", "0", "[1, 2147483647]"),
    ("llmserve.engine_service", "--num-kv-blocks", "0", "[1, 2147483647]"),
    ("llmserve.engine_service", "--max-model-len", "1", "[2, 2147483647]"),
    ("llmserve.engine_service", "--gpu-memory-utilization", "0", "(0, 1]"),
    ("llmserve.engine_service", "--gpu-memory-utilization", "1.5", "(0, 1]"),
    ("llmserve.engine_service", "--kv-cache-memory-gb", "nan", "(0, 4096]"),
    ("llmserve.engine_service", "--tensor-parallel-size", "0", "[1, 64]"),
    ("llmserve.engine_service", "--port", "70000", "[0, 65535]"),
    ("llmserve.engine_service", "--health-port", "-2", "[-1, 65535]"),
    ("llmserve.router", "--max-message-mb", "0", "[1, 2047]"),
    ("llmserve.router", "--max-concurrent-rpcs", "0", "[1, 2147483647]"),
    ("llmserve.router", "--metrics-port", "-5", "[-1, 65535]"),
    ("llmserve.router", "--max-connection-age-s", "0", "[1, 86400]"),
])
def test_a_value_out_of_bounds_stops_start_up_naming_the_flag(
    module: str, flag: str, value: str, limit: str, tmp_path: Path
) -> None:
    result = run_cli(module, flag, value, cwd=tmp_path)
    assert result.returncode == 2
    assert f"error: {flag} must be in {limit}, not " in result.stderr


@pytest.mark.parametrize(("module", "args", "message"), [
    # Block size 0 once divided by zero; now a choice refused by the parser.
    ("llmserve.engine_service", ("--block-size", "0"), "argument --block-size: invalid choice"),
    ("llmserve.engine_service", ("--log-level", "loud"), "argument --log-level: invalid choice"),
    ("llmserve.router", ("--engines", " , "), "--engines: give at least one host:port"),
])
def test_other_refused_values_name_the_flag(
    module: str, args: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    result = run_cli(module, *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr


def test_bounds_hold_for_configs_built_in_code_too() -> None:
    with pytest.raises(ValueError, match=r"^--max-num-seqs must be in \[1, 2147483647\], not 0$"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match=r"^block_hash_seed must be in \[0, "):
        EngineConfig(block_hash_seed=-1)
    with pytest.raises(ValueError, match=r"^--block-size must be one of 1, 2, 4, "):
        EngineConfig(block_size=3)
    # None is the default of an optional limit, never out of bounds.
    assert EngineConfig(max_model_len=None, num_kv_blocks=None).max_model_len is None


def test_resolved_max_model_len_is_the_checkpoints_unless_asked_for_less() -> None:
    assert EngineConfig().resolved(4096).max_model_len == 4096
    assert EngineConfig(max_model_len=100).resolved(4096).max_model_len == 100
    assert EngineConfig(max_model_len=8192).resolved(4096).max_model_len == 4096


def test_engine_config_survives_the_json_sent_to_tensor_parallel_ranks() -> None:
    config = EngineConfig(model=Path("/m"), tls_cert=Path("/c.pem"), num_kv_blocks=7)
    sent = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    assert from_json_fields(EngineConfig, sent) == config
