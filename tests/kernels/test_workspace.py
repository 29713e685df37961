"""The single-pass kernels' arrival counters (kernels/workspace.py): one zeroed buffer per device, reserved
outside captures; a capture that finds none gets per-call zeros."""
import pytest
import torch

from kernopt.kernels import workspace


def test_one_buffer_per_device_grows_and_keeps_the_old_alive():
    dev = torch.device("cpu")
    a = workspace.arrival_counters(dev, 10)
    assert a.dtype == torch.int32 and a.numel() >= workspace.RESERVE and int(a.count_nonzero()) == 0
    assert workspace.arrival_counters(dev, 5).data_ptr() == a.data_ptr()  # reused, not reallocated
    b = workspace.arrival_counters(dev, workspace.RESERVE + 1)
    assert b.numel() >= workspace.RESERVE + 1 and b.data_ptr() != a.data_ptr()
    assert any(t is a for t in workspace._OUTGROWN)  # a captured graph may still point at it
    assert workspace.arrival_counters(dev, 3).data_ptr() == b.data_ptr()


@pytest.mark.gpu
def test_gpu_capture_never_allocates_the_buffer():
    dev = torch.device("cuda", torch.cuda.current_device())
    saved = workspace._BUFFERS.pop(str(dev), None)
    try:
        stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            c = workspace.arrival_counters(dev, 7)
        assert str(dev) not in workspace._BUFFERS  # per-call zeros from the capture's pool instead
        assert c.numel() == 7
        graph.replay()
        torch.cuda.synchronize()
        assert int(c.count_nonzero()) == 0
        assert workspace.reserve(dev).numel() >= workspace.RESERVE
    finally:
        if saved is not None:
            workspace._BUFFERS[str(dev)] = saved


@pytest.mark.gpu
def test_gpu_backend_reserves_before_compiled_graphs_run():
    import kernopt  # noqa: F401

    x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
    lin = torch.nn.Linear(64, 128, device="cuda", dtype=torch.float16)
    fn = lambda x: torch.nn.functional.silu(lin(x))  # noqa: E731  (an epilogue: rewritten at small M)
    workspace._BUFFERS.pop(str(x.device), None)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend="kernopt")(x)
    assert workspace._key(x.device) in workspace._BUFFERS
