"""docs/benchmarks.md's results table matches benchmarks/results/, and the latest-per-key rule."""

import json
import subprocess
from pathlib import Path

import pytest
from benchmark_scripts import load_script

REPO = Path(__file__).resolve().parents[2]
GPU = "NVIDIA H100 80GB HBM3"

rt = load_script("results_table")


def test_docs_table_matches_the_results(capsys: pytest.CaptureFixture[str]) -> None:
    history = rt.History.of(rt.RESULTS_DIR)
    shallow = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not history.order or shallow == "true":
        pytest.skip("the latest result per key is decided by git history, which is absent here")
    code = rt.main(["--check"])
    assert code == 0, capsys.readouterr().err


# --- the rule, on a throwaway repository --------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    identity = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    return subprocess.run(
        ["git", "-C", str(repo), *identity, *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _commit(repo: Path, message: str, path: str | None = None) -> str:
    if path:
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(message)
        _git(repo, "add", path)
    _git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def _w1(commit: str, block: int = 16, impl: str = "llmserve-triton-graphs", **extra) -> dict:
    backend = "flash_attn" if "flash_attn" in impl else "triton"
    return {
        "workload": "W1",
        "device": GPU,
        "commit": commit[:7],
        "parameters": {
            "impl": impl,
            "model": "qwen3-0.6b-shape",
            "block_size": block,
            "enforce_eager": "eager" in impl,
        },
        "figures": {"tok_per_s": 100.0, "wall_s": 1.0, "attention_backend": backend},
        **extra,
    }


def _w2(commit: str, rates: list[str], repeats: int = 1, router_flags: list | None = None):
    run = {"ttft_s": {"p50": 0.005}, "itl_s": {"p50": 0.001}}
    return {
        "workload": "W2",
        "device": GPU,
        "commit": commit[:7],
        "parameters": {
            "rates_per_s": rates,
            "model": "qwen3-0.6b-shape",
            "repeats": repeats,
            "router_flags": router_flags or [],
        },
        "figures": {"runs": {r: {"engine": run, "router": run} for r in rates}},
    }


def test_latest_per_key(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    h1 = _commit(repo, "one")
    h2 = _commit(repo, "two")
    h3 = _commit(repo, "router change", "router/x.py")
    _commit(repo, f"Revert {h3[:7]} (slower)", "router/x.py")  # undoes h3's code
    h5 = _commit(repo, "test change", "tests/test_x.py")
    _commit(repo, 'Revert "test change"\n\nThis reverts commit ' + h5 + ".", "tests/test_x.py")

    results = repo / "benchmarks" / "results"
    results.mkdir(parents=True)
    files = {
        # W1 triton graphs, block 16: h2 is the newest commit that is not reverted.
        "W1-b16-h1.json": _w1(h1),
        "W1-b16-h2.json": _w1(h2),
        "W1-b16-h3.json": _w1(h3),
        # Block 128 is another configuration; a probe run never counts.
        "W1-b128-h1.json": _w1(h1, block=128),
        "W1-b128-h2.json": _w1(h2, block=128, note="tiles forced by a probe sitecustomize"),
        # A label in the name is no configuration; a reverted test is no reason to drop a result.
        "W1-peer-h2.json": _w1(h2, impl="transformers"),
        "W1-peer-h5-repeat2.json": _w1(h5, impl="transformers"),
        # Same commit, added together: the name that sorts last.
        "W1-eager-a.json": _w1(h2, impl="llmserve-triton-eager"),
        "W1-eager-b.json": _w1(h2, impl="llmserve-triton-eager"),
        # Same commit: a file not committed yet is the newest.
        "W1-fa-committed.json": _w1(h2, impl="llmserve-flash_attn-graphs"),
        # W2: each rate is a key of its own; then more repeats win.
        "W2-h1.json": _w2(h1, ["4", "all"]),
        "W2-h2.json": _w2(h2, ["4"]),
        "W2-bp-a.json": _w2(h2, ["all"], repeats=3, router_flags=["--busy-poll"]),
        "W2-bp-b.json": _w2(h2, ["all"], repeats=2, router_flags=["--busy-poll"]),
        # Not workload results: kept only while the docs cite them.
        "diagnostics-cited.json": {"workload": "diagnostics: a timeline", "commit": h2[:7]},
        "diagnostics-other.json": {"workload": "diagnostics: another", "commit": h2[:7]},
        "summary.txt": {},
    }
    for name, record in files.items():
        (results / name).write_text(json.dumps(record))
    _git(repo, "add", "benchmarks")
    _git(repo, "commit", "-q", "-m", "results")
    (results / "W1-fa-untracked.json").write_text(
        json.dumps(_w1(h2, impl="llmserve-flash_attn-graphs"))
    )

    docs = repo / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text(
        f"# Benchmarks\n\nSee benchmarks/results/diagnostics-cited.json.\n\n{rt.START}\n{rt.END}\n"
    )
    history = rt.History.of(results)
    assert rt.to_prune(results, docs.read_text(), history) == [
        "W1-b128-h2.json",
        "W1-b16-h1.json",
        "W1-b16-h3.json",
        "W1-eager-a.json",
        "W1-fa-committed.json",
        "W1-peer-h2.json",
        "W2-bp-b.json",
        "diagnostics-other.json",
        "summary.txt",
    ]

    # Prune, render, check; then the check catches a stale table and a dead citation.
    args = ["--results", str(results), "--docs", str(docs)]
    assert rt.main([*args, "--check"]) == 1  # not pruned yet
    assert rt.main([*args, "--prune", "--delete"]) == 0
    assert rt.main(args) == 0
    assert rt.main([*args, "--check"]) == 0
    table = docs.read_text()
    assert table.count("| W2 | default, ") == 2  # 4 req/s from W2-h2, all at once from W2-h1
    assert "[JSON](../benchmarks/results/W2-h1.json)" in table
    assert "| W1 | transformers peer |" in table
    docs.write_text(table.replace("100 tok/s", "99 tok/s", 1))
    assert rt.main([*args, "--check"]) == 1
    docs.write_text(table + "\nAlso benchmarks/results/gone.json.\n")
    assert rt.main([*args, "--check"]) == 1


def test_w7_renders_speed_ratio_and_validity(tmp_path: Path) -> None:
    record = _w1("abcdef1")
    record["workload"] = "W7"
    record["parameters"] |= {"max_tokens_cap": 300, "limit": 4}
    record["figures"] |= {
        "tok_per_s": 18950.4,
        "unconstrained_tok_per_s": 20010.0,
        "ratio": 0.947,
        "valid": 231,
        "stop": 231,
        "length": 25,
    }
    path = tmp_path / "W7-h100-abcdef1.json"
    path.write_text(json.dumps(record))
    result = rt.read_result(path)
    assert result.configuration == (
        "llmserve-triton-graphs, block 16, first 4 requests, max_tokens capped at 300"
    )
    assert rt.headline(result, "") == (
        "18,950 tok/s with schemas, 20,010 without (x0.947); valid 231/231 stop outputs, "
        "25 cut by length"
    )


def test_w1l_rows_are_w1s_on_the_8b_shape_one_per_quantization(tmp_path: Path) -> None:
    """W1L renders as W1 does, with qwen3-8b-shape as its standard model; bf16, FP8 weights
    and FP8 weights + FP8 KV are three configurations (each keeps its latest result)."""
    labels = []
    for quantization, kv in (("none", "auto"), ("fp8", "auto"), ("fp8", "fp8_e4m3")):
        record = _w1("abcdef1")
        record["workload"] = "W1L"
        record["parameters"] |= {"model": "qwen3-8b-shape", "quantization": quantization,
                                 "kv_cache_dtype": kv}
        path = tmp_path / f"W1L-{quantization}-{kv}.json"
        path.write_text(json.dumps(record))
        result = rt.read_result(path)
        labels.append(result.configuration)
        assert rt.headline(result, "").startswith("100 tok/s")
    assert labels == ["llmserve-triton-graphs, block 16",
                      "llmserve-triton-graphs-wfp8, block 16",
                      "llmserve-triton-graphs-wfp8-kvfp8, block 16"]
    assert rt.WORKLOAD_ORDER.index("W1L") == rt.WORKLOAD_ORDER.index("W1") + 1


def test_fp8_linear_renders_the_8b_gate_up_speedups(tmp_path: Path) -> None:
    """The FP8 linear micro-benchmark: one row per device (--small apart), its figures
    fp8_linear's speed-up over bf16 on 8B gate_up at M = 1 and 256, and what went wrong."""
    summary = {
        "shape": "8B.gate_up",
        "fp8_linear_speedup_over_bf16_by_m": {"1": 1.74, "16": 1.5, "256": 1.21},
        "failed_ops": 0,
        "ops_off_twin": 0,
    }
    record = {
        "workload": "fp8-linear",
        "device": GPU,
        "commit": "abcdef1",
        "parameters": {"small": False},
        "figures": {"summary": summary, "rows": []},
    }
    path = tmp_path / "fp8-linear.json"
    path.write_text(json.dumps(record))
    result = rt.read_result(path)
    assert result.configuration == "default"
    assert rt.headline(result, "") == (
        "8B.gate_up fp8_linear over bf16: x1.74 at M = 1, x1.21 at M = 256"
    )
    summary |= {"failed_ops": 2, "fp8_linear_speedup_over_bf16_by_m": {"1": 1.74}}
    path.write_text(json.dumps(record))
    assert rt.headline(rt.read_result(path), "") == (
        "8B.gate_up fp8_linear over bf16: x1.74 at M = 1, x? at M = 256 "
        "(2 ops failed, 0 off their twin)"
    )
    assert rt.WORKLOAD_ORDER.index("fp8-linear") == rt.WORKLOAD_ORDER.index("K1") + 1
