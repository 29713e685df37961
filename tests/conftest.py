"""Test harness: on a machine without CUDA, Triton kernels run under Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported anywhere, so it is set here, at collection.
Tests that need a GPU are marked `gpu` and skip with a reason on CPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles its own models with its own options: start from an empty Dynamo cache.
    torch._dynamo.reset()
    yield


def _graph_replays(run, x: torch.Tensor, out: torch.Tensor, check, times: int = 3) -> None:
    """`run()` writes `out` from `x`: one eager call, a CUDA-graph capture of it, then `times` replays, each on fresh
    random x into a NaN-poisoned out, each checked by `check(out)` (which asserts)."""
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(times):
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        check(out)


@pytest.fixture
def graph_replays():
    """_graph_replays, for the GPU tests of kernels that must stay right under CUDA-graph replay."""
    return _graph_replays

