"""int4_gemm impl "tgemv" (kernels/int4_tgemv.py, Gluon): one row of bf16 x, whole-K column strips fed by a TMA ring.

Gluon kernels do not run under Triton's interpreter: on CPU this file checks the geometry (steps cover K, the layout
fits the step tile), the candidates and the refusals; tests/kernels/test_sm90_compile.py compiles the kernel for
sm_90a. The kernel itself runs in the tests marked gpu, against the float64 reference.
"""
import pytest
import torch

from kernopt.kernels import int4_tgemv as tg
from kernopt.kernels.int4_gemm import candidate_configs, int4_gemm, int4_gemm_ref
from kernopt.tolerance import mismatch, rms

TGEMV = {"impl": "tgemv", "BLOCK_N": 32, "ROWS": 64, "num_warps": 8, "num_stages": 4}


def _weights(N, K, g, asym, device, dtype=torch.bfloat16):
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=device).t()
    scales = (torch.rand(K // g, N, device=device) * 0.02 + 0.005).to(dtype).t()
    zeros = torch.randint(0, 16, (K // g, N), device=device).to(dtype).t() if asym else None
    return qweight, scales, zeros


def _tgemv_cands(K=4096, N=14336, g=128):
    return [c for c in candidate_configs(1, N, K, g) if c["impl"] == "tgemv"]


@pytest.mark.parametrize("g", [32, 64, 128, 256, 512])
@pytest.mark.parametrize("K_groups", [1, 5, 33])
def test_tgemv_geometry_covers_k(g, K_groups):
    """Every candidate's steps hold whole groups (GR >= 1, 8 ROWS of K or one group) and cover K exactly once: the
    last step may run past K (TMA zero-fills it), never short of it; the step tile fits the layout."""
    K = K_groups * g
    for cfg in _tgemv_cands(K, 4096, g):
        gr, nsteps = tg.tgemv_geometry(K, g, cfg)
        assert gr >= 1 and gr * g >= min(8 * cfg["ROWS"], g)
        assert (nsteps - 1) * gr < K // g <= nsteps * gr
        assert tg.strip_warps(gr, g // 8, cfg["BLOCK_N"], cfg["num_warps"]) is not None


def test_strip_warps_refuses_tiles_smaller_than_the_layout():
    assert tg.strip_warps(4, 16, 32, 8) == (2, 4)   # group 128, 64 rows: 2 x 4 warps over 4 groups x 16 rows
    assert tg.strip_warps(16, 4, 32, 8) == (8, 1)   # group 32: one warp row of 4 lanes per group
    assert tg.strip_warps(1, 4, 32, 8) is None      # one group of 4 word rows: 8 warps would repeat it
    assert tg.strip_warps(4, 16, 48, 8) is None     # 12 lanes along a row do not divide a warp
    assert tg.strip_warps(4, 2, 32, 4) is None      # 2 word rows a group: fewer than a warp's 4 lane rows


def test_tgemv_candidates_only_at_one_row_and_groups_of_32_and_more():
    assert _tgemv_cands() and all(c["BLOCK_N"] in (16, 32, 64) for c in _tgemv_cands())
    assert not [c for c in candidate_configs(2, 14336, 4096, 128) if c["impl"] == "tgemv"]
    assert not [c for c in candidate_configs(1, 4096, 4096, 16) if c["impl"] == "tgemv"]


def test_tgemv_refusals(monkeypatch):
    """Inputs the kernel cannot take get a clear error, never a wrong answer."""
    qweight, scales, zeros = _weights(64, 512, 128, True, "cpu")
    x = torch.randn(1, 512, dtype=torch.bfloat16)
    assert tg.tgemv_supported(x, qweight, scales, zeros, 128) is None
    assert "bfloat16" in tg.tgemv_supported(x.half(), qweight, scales, zeros, 128)
    assert "one row" in tg.tgemv_supported(torch.randn(2, 512, dtype=torch.bfloat16), qweight, scales, zeros, 128)
    assert "group_size" in tg.tgemv_supported(x, qweight, scales, zeros, 16)
    assert "N-contiguous" in tg.tgemv_supported(x, qweight.contiguous(), scales, zeros, 128)
    assert "scales" in tg.tgemv_supported(x, qweight, scales.contiguous(), zeros, 128)
    assert "zeros" in tg.tgemv_supported(x, qweight, scales, zeros.to(torch.int32), 128)
    with pytest.raises(ValueError, match="one row"):
        int4_gemm(torch.randn(3, 512, dtype=torch.bfloat16), qweight, scales, zeros, 128, config=TGEMV)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="interpreter"):
        int4_gemm(x, qweight, scales, zeros, 128, config=TGEMV)


def _check(x, qweight, scales, zeros, g, cfg, bias=None, out=None):
    """The kernel's output (into a NaN-poisoned out) against the float64 reference: PAIRS' packed bf16 sums carry
    bf16 rounding of x (q - 8) products, an error proportional to the outputs' RMS, so atol scales with it."""
    if out is None:
        out = torch.full((1, qweight.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    assert int4_gemm(x, qweight, scales, zeros, g, bias=bias, config=cfg, out=out) is out
    expected = int4_gemm_ref(x.double(), qweight, scales, zeros, g, None if bias is None else bias.double())
    problem = mismatch(out, expected, x.dtype, scale=2.0, magnitude=rms(expected))
    assert problem is None, f"{cfg}: {problem}"


@pytest.mark.gpu
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_tgemv_gpu_candidates(g, asym):
    """Every tgemv candidate: N = 1000 (a ragged last strip), K = 5 x 128 or 5 groups (a short last step), bias,
    NaN-poisoned out, twice in a row."""
    N, K = 1000, 5 * max(g, 128)
    qweight, scales, zeros = _weights(N, K, g, asym, "cuda")
    x = torch.randn(1, K, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(N, dtype=torch.bfloat16, device="cuda")
    cands = _tgemv_cands(4096, 14336, g)
    assert cands
    for cfg in cands:
        for _ in range(2):
            _check(x, qweight, scales, zeros, g, cfg, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("asym", [True, False])
def test_tgemv_gpu_extreme_codes_fractional_zeros_strided_x_graph(asym, graph_replays):
    """Words of distinct / extreme codes (each nibble must meet its own x), fractional zero points, |x| ~ 1e3, fp32
    scales, a strided x (copied by the launcher), a Llama shape, and CUDA-graph replay."""
    g, N, K = 128, 160, 1024
    _, s, _ = _weights(N, K, g, False, "cuda")
    z = (torch.rand(K // g, N, device="cuda") * 15).to(torch.bfloat16).t() if asym else None
    for word in (0x0F0F0F0F, -0x0F0F0F10, 0x76543210, -0x01234568):
        qw = torch.full((K // 8, N), word, dtype=torch.int32, device="cuda").t()
        _check(torch.randn(1, K, dtype=torch.bfloat16, device="cuda") * 1e3, qw, s, z, g, TGEMV)
    qweight, scales, zeros = _weights(N, K, g, asym, "cuda")
    _check(torch.randn(1, K, dtype=torch.bfloat16, device="cuda"), qweight, scales.float(), zeros, g, TGEMV)
    xs = torch.randn(1, 2 * K, dtype=torch.bfloat16, device="cuda")[:, ::2]
    _check(xs, qweight, scales, zeros, g, TGEMV)
    qweight, scales, zeros = _weights(14336, 4096, g, asym, "cuda")
    _check(torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda"), qweight, scales, zeros, g, TGEMV)
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(1, 14336, dtype=torch.bfloat16, device="cuda")

    def check(o):
        expected = int4_gemm_ref(x.double(), qweight, scales, zeros, g)
        assert mismatch(o, expected, x.dtype, scale=2.0, magnitude=rms(expected)) is None

    graph_replays(lambda: int4_gemm(x, qweight, scales, zeros, g, config=TGEMV, out=out), x, out, check)
