"""Kernel tests: Triton's interpreter on CPU tensors where there is no CUDA device.

Also holds the paged-KV helpers the attention tests share (as the `paged` fixture: with
--import-mode=importlib test modules cannot import one another).
"""

import os
import subprocess
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

from llmserve.engine_service.attention import kv_cache

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # Triton picks interpreter or compiler when a kernel is decorated, its own library's kernels
    # at `import triton`. llmserve.kernels turns the interpreter on before that for CPU builds of
    # torch; with a CUDA build on a machine without a GPU, modules that earlier test folders
    # imported are dropped (all but Triton's compiled core) so that they import again, interpreted.
    os.environ["TRITON_INTERPRET"] = "1"
    for name in [
        m for m in sys.modules if m.startswith(("triton.", "llmserve.kernels.")) or m == "triton"
    ]:
        if not name.startswith("triton._C"):
            del sys.modules[name]


def _compile_for_sm90(script: str) -> None:
    """Runs a script that compiles kernels for Hopper and prints "compiled", in a subprocess:
    kernels decorated in this process may be interpreted ones. Triton ships ptxas, so no GPU."""
    pytest.importorskip("triton.backends.nvidia")
    # "0", not unset: llmserve.kernels turns the interpreter on by default without CUDA torch.
    env = {**os.environ, "TRITON_INTERPRET": "0", "LLMSERVE_TRITON_ON_CPU": "0"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.fixture
def compile_for_sm90() -> Callable[[str], None]:
    return _compile_for_sm90


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """Fresh inputs for every test, reproducible from its id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@dataclass
class PagedKV:
    """A paged K/V pool plus the dense per-sequence K/V it was scattered from."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    dense_k: list[torch.Tensor]
    dense_v: list[torch.Tensor]


class Paged:
    """Builders and checks for the paged-attention tests."""

    @staticmethod
    def pool(
        lens: Sequence[int],
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str,
        spare_pages: int = 5,
    ) -> PagedKV:
        """Random K/V for each sequence, scattered over randomly ordered pages of a larger pool.

        Unused pool pages and table entries hold large garbage, so reading past a sequence's
        length or through a wrong page shows up as a large error.
        """
        pages = [-(-length // block_size) for length in lens]
        num_blocks = sum(pages) + spare_pages
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k_cache = torch.randn(shape, device=device).mul_(100).to(dtype)
        v_cache = torch.randn(shape, device=device).mul_(100).to(dtype)
        order = torch.randperm(num_blocks, device=device).to(torch.int32)
        tables = torch.full(
            (len(lens), max([*pages, 1]) + 2), int(order[-1]), dtype=torch.int32, device=device
        )
        dense_k, dense_v = [], []
        used = 0
        for b, length in enumerate(lens):
            own = order[used : used + pages[b]]
            used += pages[b]
            tables[b, : pages[b]] = own
            k = torch.randn(length, num_kv_heads, head_dim, device=device).to(dtype)
            v = torch.randn(length, num_kv_heads, head_dim, device=device).to(dtype)
            flat = (
                own.long()[:, None] * block_size + torch.arange(block_size, device=device)
            ).flatten()[:length]
            k_cache.view(-1, num_kv_heads, head_dim)[flat] = k
            v_cache.view(-1, num_kv_heads, head_dim)[flat] = v
            dense_k.append(k)
            dense_v.append(v)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        return PagedKV(k_cache, v_cache, tables, seq_lens, dense_k, dense_v)

    @staticmethod
    def fp8(kv: PagedKV) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The pool as the engine's e4m3 cache (kv_cache.quantize_pages): K, V and their scales
        [num_blocks, Hkv, block_size]."""
        cache = kv_cache.quantize_pages(kv.k_cache, kv.v_cache)
        assert cache.scales is not None
        return cache.k, cache.v, cache.scales

    @staticmethod
    def starts(q_lens: Sequence[int], device: str) -> torch.Tensor:
        """query_start_loc [B+1] int32 for the given query lengths."""
        cumulative = [0]
        for n in q_lens:
            cumulative.append(cumulative[-1] + n)
        return torch.tensor(cumulative, dtype=torch.int32, device=device)

    @staticmethod
    def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
        """Norm-wise relative error ||out - ref|| / ||ref||, in fp64."""
        return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture
def paged() -> type[Paged]:
    return Paged
