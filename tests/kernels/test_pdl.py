"""KERNOPT_PDL (kernels/pdl.py): programmatic dependent launch for the decode path's kernels.

On CPU: the switch (off by default, bad values refused) and that nothing asks for PDL off a CUDA device. Offline
sm_90a (test_sm90_compile.py, the "PDL" cases): the kernels carry griddepcontrol with PDL on, without new spills.
On the GPU: a decode-shaped chain of PDL launches (int4 GEMVs each reading the one before, the bf16 GEMV, decode
attention with the cache append and its merge) eagerly and replayed from a CUDA graph, bit for bit the results of
the same launches without PDL (PDL changes when a kernel starts, never what it computes)."""
import pytest
import torch

from kernopt.kernels import pdl, workspace
from kernopt.kernels.decode_attention import decode_attention_append
from kernopt.kernels.gemm import gemm
from kernopt.kernels.int4_gemm import int4_gemm


def test_pdl_switch(monkeypatch):
    monkeypatch.delenv(pdl.PDL_ENV, raising=False)
    assert not pdl.pdl_enabled() and pdl.launch_kwargs(False) == {}
    monkeypatch.setenv(pdl.PDL_ENV, "1")
    assert pdl.pdl_enabled() and pdl.launch_kwargs(True) == {"launch_pdl": True}
    assert not pdl.use_pdl(torch.zeros(1))  # CPU tensors: never
    monkeypatch.setenv(pdl.PDL_ENV, "yes")
    with pytest.raises(ValueError, match=pdl.PDL_ENV):
        pdl.pdl_enabled()


def _chain(x, layers, w_bf16, attn):
    """x -> three int4 GEMVs (each reads the previous output) -> bf16 GEMV -> q of decode attention with the append."""
    h = x
    for qweight, scales in layers:
        h = int4_gemm(h, qweight, scales, None, 128)
    y = gemm(h, w_bf16)
    k_new, v_new, cos, sin, k_cache, v_cache, pos = attn
    q = y[:, :32 * 128].view(1, 32, 1, 128)
    return h, y, decode_attention_append(q, k_new, v_new, cos, sin, k_cache, v_cache, pos)


@pytest.mark.gpu
def test_pdl_chain_matches_without_pdl_eager_and_in_a_cuda_graph(monkeypatch):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("PDL needs sm_90+")
    torch.manual_seed(0)
    dev, dt, K = "cuda", torch.bfloat16, 4096
    layers = []
    for _ in range(3):
        qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, K), dtype=torch.int32, device=dev).t()
        scales = (torch.rand(K // 128, K, device=dev) * 0.02 + 0.005).to(dt).t()
        layers.append((qweight, scales))
    w_bf16 = torch.randn(6144, K, dtype=dt, device=dev) * 0.02
    S = 256
    k_cache0 = torch.randn(1, 8, S, 128, dtype=dt, device=dev)
    v_cache0 = torch.randn(1, 8, S, 128, dtype=dt, device=dev)
    k_new = torch.randn(1, 8, 1, 128, dtype=dt, device=dev)
    v_new = torch.randn(1, 8, 1, 128, dtype=dt, device=dev)
    cos, sin = torch.randn(1, 1, 1, 128, dtype=dt, device=dev), torch.randn(1, 1, 1, 128, dtype=dt, device=dev)
    pos = torch.tensor([100], device=dev)

    def run(x, pdl_on):
        monkeypatch.setenv(pdl.PDL_ENV, "1" if pdl_on else "0")
        kc, vc = k_cache0.clone(), v_cache0.clone()
        outs = _chain(x, layers, w_bf16, (k_new, v_new, cos, sin, kc, vc, pos))
        return [t.clone() for t in outs] + [kc, vc]

    xs = [torch.randn(1, K, dtype=dt, device=dev) for _ in range(3)]
    want = [run(x, False) for x in xs]
    for x, w in zip(xs, want):
        for a, b in zip(run(x, True), w):
            assert torch.equal(a, b)
    # captured with PDL on, replayed on new inputs copied into the graph's static ones
    monkeypatch.setenv(pdl.PDL_ENV, "1")
    static_x = xs[0].clone()
    kc, vc = k_cache0.clone(), v_cache0.clone()
    _chain(static_x, layers, w_bf16, (k_new, v_new, cos, sin, kc, vc, pos))  # warm-up: compiles outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _chain(static_x, layers, w_bf16, (k_new, v_new, cos, sin, kc, vc, pos))
    for x, w in zip(xs, want):
        static_x.copy_(x)
        kc.copy_(k_cache0)
        vc.copy_(v_cache0)
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(list(outs) + [kc, vc], w):
            assert torch.equal(a, b)
    for buf in workspace._BUFFERS.values():
        assert not buf.any()
