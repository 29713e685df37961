"""FP8 GEMM and per-token FP8 quantization against plain-torch / float64 references.

On CPU the Triton kernels run in the interpreter (fp32/fp16 outputs); bf16 and the PTX check run on the GPU.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernopt.kernels import fp8_gemm as fp8
from kernopt.tolerance import assert_close

E4M3 = torch.float8_e4m3fn
ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"

PTR = dict(SWAP_AB=False, TMA=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)
SWAP = dict(SWAP_AB=True, TMA=False, BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2)
TMA = dict(SWAP_AB=False, TMA=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2,
           FLATTEN=False)


def _fp8(shape, spread=2.0):
    return (torch.randn(shape, device=DEV) * spread).clamp(-448, 448).to(E4M3)


def _gemm_ref64(a, b, sa, sb, bias):
    """float64 (a @ b) * sa * sb + bias, and the magnitude |a| @ |b| * |sa| * |sb| the error scales with."""
    sa64 = sa.double().reshape(-1, 1) if sa.numel() > 1 else sa.double().reshape(())
    sb64 = sb.double().reshape(1, -1) if sb.numel() > 1 else sb.double().reshape(())
    y = (a.double() @ b.double()) * sa64 * sb64
    mag = float(((a.double().abs() @ b.double().abs()) * sa64.abs() * sb64.abs()).max()) or 1.0
    if bias is not None:
        y = y + bias.double()
    return y, mag


def _assert_gemm_close(out, ref, mag, dtype):
    # normalise by the largest |a| @ |b| term: fp32 accumulation error grows with it, not with |result|.
    # Hopper's fp8 tensor cores (wgmma e4m3) add products with fewer than fp32's mantissa bits (measured
    # ~4e-5 of the magnitude here; cuBLAS's use_fast_accum=True does the same): widen fp32's tolerance there.
    assert not torch.isnan(out).any(), "NaN in output (an element was never written)"
    widen = 16.0 if (out.is_cuda and dtype == torch.float32) else 1.0
    assert_close(out.double().cpu() / mag, ref.cpu() / mag, dtype, scale=widen)


# --------------------------------------------------------------------------------------------------
# Activation / weight quantization
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,block_k", [(7, 53, None), (13, 200, 64), (3, 1000, 128), (1, 5, None)])
def test_quantize_rows_matches_reference_bitwise(M, K, block_k, dtype):
    x = (torch.randn(M, K, device=DEV) * 3).to(dtype)
    x[0, : K // 2] *= 1e-4  # values in e4m3's subnormal range after scaling
    q, s = fp8.quantize_rows_fp8(x, block_k=block_k)
    q_ref, s_ref = fp8.quantize_rows_fp8_ref(x)
    assert q.dtype == E4M3 and q.shape == (M, K) and s.shape == (M, 1) and s.dtype == torch.float32
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), \
        f"{int((q.float() != q_ref.float()).sum())} quantized values differ"


@pytest.mark.parametrize("block_k", [None, 32])
def test_quantize_round_trip(block_k):
    x = torch.randn(9, 77, device=DEV, dtype=torch.float32) * torch.logspace(-3, 3, 9, device=DEV)[:, None]
    q, s = fp8.quantize_rows_fp8(x, block_k=block_k)
    deq = q.float() * s
    # e4m3 keeps 3 mantissa bits: normal values round within 2^-4 relative; subnormals within half a step
    bound = x.abs() * 2.0 ** -4 + s * 2.0 ** -10
    assert ((deq - x).abs() <= bound).all()
    # and x is recovered no worse than the reference's own round trip
    q_ref, s_ref = fp8.quantize_rows_fp8_ref(x)
    assert torch.equal(deq, q_ref.float() * s_ref)


def test_quantize_saturates_at_448():
    x = torch.tensor([[1000.0, -1000.0, 1.0, 0.5], [3.0, -7.0, 2.0, 1e-9], [1e30, -1e30, 1e29, 0.0]], device=DEV)
    q, s = fp8.quantize_rows_fp8(x)
    qf = q.float()
    assert torch.isfinite(qf).all()
    assert qf.abs().max() <= 448
    # the row's largest magnitude maps to exactly +-448
    assert qf[0, 0] == 448 and qf[0, 1] == -448 and qf[1, 1] == -448 and qf[2, 0] == 448 and qf[2, 1] == -448
    torch.testing.assert_close(s.flatten(), torch.tensor([1000 / 448, 7 / 448, 1e30 / 448], device=DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_all_zero_row(dtype):
    x = torch.randn(4, 40, device=DEV).to(dtype)
    x[2] = 0
    q, s = fp8.quantize_rows_fp8(x, block_k=16)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s[2, 0].item() == pytest.approx(fp8.AMAX_FLOOR / fp8.FP8_MAX)
    assert (q[2].float() == 0).all() and not torch.isnan(q.float()).any()
    # the GEMM on it: that output row is exactly the bias
    w_fp8, w_scale = fp8.quantize_weight_fp8(torch.randn(24, 40, device=DEV))
    bias = torch.randn(24, device=DEV).to(dtype)
    y = fp8.fp8_linear(x, w_fp8, w_scale, bias, config=PTR)
    assert torch.equal(y[2], bias)


def test_quantize_weight_per_output_channel():
    w = torch.randn(19, 33, device=DEV) * torch.linspace(0.01, 10, 19, device=DEV)[:, None]
    w[5] = 0
    q, s = fp8.quantize_weight_fp8(w)
    assert q.dtype == E4M3 and s.shape == (19,)
    amax = w.abs().amax(1)
    expect = torch.where(amax > 0, amax / 448, torch.full_like(amax, fp8.AMAX_FLOOR / 448))
    torch.testing.assert_close(s, expect)
    assert ((q.float() * s[:, None] - w).abs() <= w.abs() * 2.0 ** -4 + s[:, None] * 2.0 ** -10).all()


# --------------------------------------------------------------------------------------------------
# The GEMM
# --------------------------------------------------------------------------------------------------
SCALINGS = ["rowwise", "tensorwise"]


def _scales(M, N, scaling):
    if scaling == "rowwise":
        return torch.rand(M, 1, device=DEV) + 0.25, torch.rand(1, N, device=DEV) + 0.25
    return torch.tensor(0.7, device=DEV), torch.tensor(1.3, device=DEV)


@pytest.mark.parametrize("cfg", [PTR, SWAP, TMA], ids=["ptr", "swap_ab", "tma"])
@pytest.mark.parametrize("M,N,K,scaling,bias,out_dtype", [
    (37, 45, 70, "rowwise", True, torch.float32),    # odd everything: masks on M, N and K
    (5, 50, 96, "tensorwise", False, torch.float16),  # M below one block
    (70, 33, 48, "rowwise", False, torch.float16),
])
def test_scaled_mm_matches_reference(cfg, M, N, K, scaling, bias, out_dtype):
    a, w = _fp8((M, K)), _fp8((N, K), 1.0)
    b = w.t()  # the _scaled_mm layout: [K, N] column-major
    sa, sb = _scales(M, N, scaling)
    bias_t = torch.randn(N, device=DEV) if bias else None
    out = torch.full((M, N), float("nan"), device=DEV, dtype=out_dtype)
    got = fp8.fp8_scaled_mm(a, b, sa, sb, bias_t, out_dtype=out_dtype, config=cfg, out=out)
    assert got is out
    ref, mag = _gemm_ref64(a, b, sa, sb, bias_t)
    _assert_gemm_close(out, ref, mag, out_dtype)
    # the plain-torch reference agrees too
    _assert_gemm_close(fp8.fp8_scaled_mm_ref(a, b, sa, sb, bias_t, out_dtype), ref, mag, out_dtype)


def test_scaled_mm_row_major_b_and_default_config():
    """b as a row-major [K, N] tensor (not the usual transposed weight): the pointer kernel handles any strides."""
    M, N, K = 9, 40, 64
    a, b = _fp8((M, K)), _fp8((K, N), 1.0).contiguous()
    sa, sb = _scales(M, N, "rowwise")
    ref, mag = _gemm_ref64(a, b, sa, sb, None)
    for cfg in (PTR, TMA, None):  # TMA falls back to the pointer kernel for a non-K-major b
        out = fp8.fp8_scaled_mm(a, b, sa, sb, out_dtype=torch.float32, config=cfg)
        _assert_gemm_close(out, ref, mag, torch.float32)


@settings(max_examples=6, deadline=None)
@given(M=st.integers(1, 90), N=st.integers(1, 70), K=st.integers(1, 90), swap=st.booleans())
def test_scaled_mm_random_shapes(M, N, K, swap):
    a, w = _fp8((M, K)), _fp8((N, K), 1.0)
    sa, sb = _scales(M, N, "rowwise")
    out = torch.full((M, N), float("nan"), device=DEV, dtype=torch.float32)
    fp8.fp8_scaled_mm(a, w.t(), sa, sb, out_dtype=torch.float32, config=SWAP if swap else PTR, out=out)
    ref, mag = _gemm_ref64(a, w.t(), sa, sb, None)
    _assert_gemm_close(out, ref, mag, torch.float32)


@pytest.mark.parametrize("M,N,K,cfg", [(3, 29, 40, None), (67, 24, 64, None), (21, 37, 75, PTR)],
                         ids=["decode-default", "prefill-default", "odd-ptr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_linear_matches_reference(M, N, K, cfg, dtype):
    x = torch.randn(M, K, device=DEV).to(dtype)
    w_fp8, w_scale = fp8.quantize_weight_fp8(torch.randn(N, K, device=DEV))
    bias = torch.randn(N, device=DEV).to(dtype)
    out = torch.full((M, N), float("nan"), device=DEV, dtype=dtype)
    fp8.fp8_linear(x, w_fp8, w_scale, bias, config=cfg, out=out)
    x_fp8, x_scale = fp8.quantize_rows_fp8_ref(x)
    ref, mag = _gemm_ref64(x_fp8, w_fp8.t(), x_scale, w_scale, bias)
    _assert_gemm_close(out, ref, mag, dtype)
    _assert_gemm_close(fp8.fp8_linear_ref(x, w_fp8, w_scale, bias), ref, mag, dtype)
    # and it approximates the unquantized linear (loosely: two e4m3 roundings)
    w_deq = w_fp8.double() * w_scale.double()[:, None]
    exact = x.double() @ w_deq.t() + bias.double()
    assert (out.double() - exact).abs().max() <= 0.1 * mag * math.sqrt(K) / K + 0.05 * exact.abs().max()


def test_fp8_linear_through_custom_op():
    import kernopt.ops  # noqa: F401  (registers torch.ops.kernopt.*)

    x = torch.randn(2, 3, 48, device=DEV)
    w_fp8, w_scale = fp8.quantize_weight_fp8(torch.randn(20, 48, device=DEV))
    y = torch.ops.kernopt.fp8_linear(x, w_fp8, w_scale, None)
    assert y.shape == (2, 3, 20)
    x_fp8, x_scale = fp8.quantize_rows_fp8_ref(x.reshape(6, 48))
    ref, mag = _gemm_ref64(x_fp8, w_fp8.t(), x_scale, w_scale, None)
    _assert_gemm_close(y.reshape(6, 20), ref, mag, torch.float32)


@pytest.mark.parametrize("M,N,K,cfg", [(3, 29, 40, None), (21, 37, 75, PTR)], ids=["decode-default", "odd-ptr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_linear_prequant_equals_fp8_linear(M, N, K, cfg, dtype):
    """The linear behind rmsnorm_quant_fp8: given quantize_rows(x), it computes what fp8_linear(x) does, bitwise
    (same GEMM, same config), and its reference is fp8_linear_ref's after the quantization, bitwise."""
    x = (torch.randn(M, K, device=DEV) * 2).to(dtype)
    w_fp8, w_scale = fp8.quantize_weight_fp8(torch.randn(N, K, device=DEV))
    bias = torch.randn(N, device=DEV).to(dtype)
    x_fp8, x_scale = fp8.quantize_rows_fp8(x)
    out = torch.full((M, N), float("nan"), device=DEV, dtype=dtype)
    fp8.fp8_linear_prequant(x_fp8, x_scale, w_fp8, w_scale, bias, dtype, config=cfg, out=out)
    assert torch.equal(out, fp8.fp8_linear(x, w_fp8, w_scale, bias, config=cfg))
    x_fp8, x_scale = fp8.quantize_rows_fp8_ref(x)
    assert torch.equal(fp8.fp8_linear_prequant_ref(x_fp8, x_scale, w_fp8, w_scale, bias, dtype),
                       fp8.fp8_linear_ref(x, w_fp8, w_scale, bias))
    with pytest.raises(ValueError, match="x_fp8 and w_fp8 must be"):
        fp8.fp8_linear_prequant(x, x_scale, w_fp8, w_scale, bias, dtype)
    with pytest.raises(ValueError, match="x_scale"):
        fp8.fp8_linear_prequant(x_fp8, x_scale[:-1], w_fp8, w_scale, bias, dtype)


def test_input_errors():
    a, w = _fp8((4, 32)), _fp8((8, 32))
    s1 = torch.ones(4, 1, device=DEV)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8.fp8_scaled_mm(a.float(), w.t(), s1, torch.ones(1, 8, device=DEV))
    with pytest.raises(ValueError, match=r"\[M, K\] and b \[K, N\]"):
        fp8.fp8_scaled_mm(a, w, s1, torch.ones(1, 8, device=DEV))
    with pytest.raises(ValueError, match="scale_b"):
        fp8.fp8_scaled_mm(a, w.t(), s1, torch.ones(1, 5, device=DEV))
    with pytest.raises(ValueError, match="float32"):
        fp8.fp8_scaled_mm(a, w.t(), s1.half(), torch.ones(1, 8, device=DEV))
    with pytest.raises(ValueError, match="w_fp8"):
        fp8.fp8_linear(torch.randn(4, 32, device=DEV), w.float(), torch.ones(8, device=DEV))
    with pytest.raises(ValueError, match="bias"):
        fp8.fp8_linear(torch.randn(4, 32, device=DEV), w, torch.ones(8, device=DEV), torch.ones(3, device=DEV))
    with pytest.raises(ValueError, match="out"):
        fp8.fp8_linear(torch.randn(4, 32, device=DEV), w, torch.ones(8, device=DEV),
                       out=torch.empty(4, 9, device=DEV))


def test_select_config_buckets():
    decode = fp8.select_config(16, 4096, 4096)
    prefill = fp8.select_config(8192, 8192, 8192)
    assert decode["SWAP_AB"] and not prefill["SWAP_AB"] and prefill["TMA"]
    assert prefill["BLOCK_M"] * prefill["BLOCK_N"] >= 128 * 128
    for M in (1, 16, 64, 65, 256, 1024, 4096, 8192):
        cfg = fp8.select_config(M, 4096, 4096)
        assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"} <= set(cfg)
        assert fp8.config_str(cfg)


# --------------------------------------------------------------------------------------------------
# The one-row gemv (kernels/gemm.py's, on e4m3 codes with the scales in its epilogue)
# --------------------------------------------------------------------------------------------------
def _gemv(bm, bn, bk, split):
    return dict(impl="gemv", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=1)


def _swapab(bn, bk, split, stages=2):
    return dict(impl="swapab", BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=stages)


@pytest.mark.parametrize("M,N,K,cfg", [
    (1, 37, 200, None),                  # the table's tile; K below one block
    (1, 24, 3000, _gemv(1, 16, 512, 4)),  # split-K (single pass), a ragged last K block and N tile
    (1, 70, 1100, _gemv(1, 32, 256, 3)),  # 3 slices: whole blocks per slice, a short last slice
    (3, 50, 700, _gemv(4, 8, 256, 2)),    # rows past M, bias
    # the K loop pipelined through shared memory (LOAD_STAGES: x one row a block, broadcast along n after)
    (1, 24, 3000, {**_gemv(1, 16, 256, 2), "num_stages": 3}),  # 6 blocks a slice, a ragged last one
    (3, 50, 1100, {**_gemv(4, 8, 128, 1), "num_stages": 2}),   # rows past M, bias, 9 blocks, a ragged last one
    # split-K swap-AB (kernels/gemm.py's swapab kernel on the codes, the same SCALED epilogue)
    (1, 70, 1100, _swapab(64, 128, 3)),   # 3 slices, a short last slice, a ragged N tile
    (3, 50, 300, _swapab(64, 64, 1)),     # one slice, x rows past M masked, bias
    (16, 130, 520, _swapab(128, 64, 4)),  # 16 rows, two N tiles, a ragged last K block
])
@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_gemv_matches_reference(M, N, K, cfg, scaling, out_dtype):
    a, w = _fp8((M, K)), _fp8((N, K), 1.0)
    sa, sb = _scales(M, N, scaling)
    bias_t = torch.randn(N, device=DEV) if M > 1 else None
    out = torch.full((M, N), float("nan"), device=DEV, dtype=out_dtype)
    got = fp8.fp8_scaled_mm(a, w.t(), sa, sb, bias_t, out_dtype=out_dtype, config=cfg, out=out)
    assert got is out
    ref, mag = _gemm_ref64(a, w.t(), sa, sb, bias_t)
    _assert_gemm_close(out, ref, mag, out_dtype)
    # twice: the split-K arrival counters are re-armed to 0 by the slice that arrives last
    out2 = torch.full((M, N), float("nan"), device=DEV, dtype=out_dtype)
    fp8.fp8_scaled_mm(a, w.t(), sa, sb, bias_t, out_dtype=out_dtype, config=cfg, out=out2)
    assert torch.equal(out2, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_linear_one_row_takes_the_gemv(dtype, monkeypatch):
    M, N, K = 1, 45, 300
    x = torch.randn(M, K, device=DEV).to(dtype)
    w_fp8, w_scale = fp8.quantize_weight_fp8(torch.randn(N, K, device=DEV))
    bias = torch.randn(N, device=DEV).to(dtype)
    assert fp8.select_config(M, N, K)["impl"] == "gemv"
    out = torch.full((M, N), float("nan"), device=DEV, dtype=dtype)
    fp8.fp8_linear(x, w_fp8, w_scale, bias, out=out)
    x_fp8, x_scale = fp8.quantize_rows_fp8_ref(x)
    ref, mag = _gemm_ref64(x_fp8, w_fp8.t(), x_scale, w_scale, bias)
    _assert_gemm_close(out, ref, mag, dtype)
    monkeypatch.setenv("KERNOPT_FP8_GEMV", "0")
    off = fp8.select_config(M, N, K)
    assert "impl" not in off and off["SWAP_AB"]
    _assert_gemm_close(fp8.fp8_linear(x, w_fp8, w_scale, bias), ref, mag, dtype)


def test_gemv_candidates_and_table():
    assert fp8.select_config(2, 4096, 4096)["SWAP_AB"]  # GEMV_MAX_M = 1
    cands = fp8.candidate_configs(1, 1024, 4096)
    gemvs = [c for c in cands if c.get("impl") == "gemv"]
    assert gemvs and any(c["SPLIT_K"] > 1 for c in gemvs) and any(c.get("SWAP_AB") for c in cands)
    assert not [c for c in fp8.candidate_configs(32, 1024, 4096) if c.get("impl") == "gemv"]
    for c in gemvs:
        assert fp8.config_str(c).startswith("gemv")
    # the table's tiles per weight shape (kernels/fp8_gemm.py gemv_tile): whole-K blocks up to 4096, 32 KB each
    assert fp8.gemv_tile(4096, 4096) == fp8.gemv_tile(1024, 4096) == (8, 4096, 4, 1)
    assert fp8.gemv_tile(14336, 4096) == fp8.GEMV_WIDE and fp8.gemv_tile(4096, 14336) == fp8.GEMV_TILE
    assert fp8.gemv_tile(37, 200) == (64, 256, 4, 1)
    assert fp8.select_config(1, 1024, 4096)["BLOCK_K"] == 4096
    # K > 4096: 1024-code blocks through the 3-stage loop (two blocks in flight), unsplit at the 8B down projection
    assert fp8.config_str(fp8.select_config(1, 4096, 14336)) == \
        "gemv BLOCK_M=1 BLOCK_N=16 BLOCK_K=1024 split_k=1 warps=4 stages=3"
    swapabs = [c for c in cands if c.get("impl") == "swapab"]
    assert swapabs and any(c["SPLIT_K"] > 1 for c in swapabs)
    assert all(fp8.config_str(c).startswith("swapab") and c["BLOCK_M"] == 16 for c in swapabs)


# --------------------------------------------------------------------------------------------------
# GPU: bf16, the default configs at real sizes, and the tensor-core instruction in the compiled code
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(1, 512, 1024), (16, 4096, 1024), (100, 1000, 520), (300, 768, 512),
                                   (1000, 1536, 1024), (4096, 4096, 1024), (257, 1000, 333)])
def test_gpu_bf16_default_configs(M, N, K):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w_fp8, w_scale = fp8.quantize_weight_fp8(torch.randn(N, K, device="cuda") / K ** 0.5)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    q, s = fp8.quantize_rows_fp8(x)
    q_ref, s_ref = fp8.quantize_rows_fp8_ref(x)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    # and an eager model that writes `amax / 448` gets the same scales on CUDA
    if x.is_cuda:
        assert torch.equal(s, x.float().abs().amax(-1, keepdim=True).clamp(min=fp8.AMAX_FLOOR) / 448.0)
    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    fp8.fp8_linear(x, w_fp8, w_scale, bias, out=out)
    ref, mag = _gemm_ref64(q_ref, w_fp8.t(), s_ref, w_scale, bias)
    _assert_gemm_close(out, ref, mag, torch.bfloat16)
    # torch._scaled_mm (cuBLAS) agrees on the same quantized operands, where it accepts the shape
    if K % 16 == 0 and N % 16 == 0:
        cub = torch._scaled_mm(q, w_fp8.t(), scale_a=s, scale_b=w_scale.reshape(1, N), bias=bias,
                               out_dtype=torch.bfloat16)
        _assert_gemm_close(cub, ref, mag, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [16, 4096])
def test_gpu_uses_fp8_wgmma(M):
    """The compiled kernel multiplies e4m3 on Hopper's tensor cores (wgmma ... e4m3), not an upcast."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma is Hopper (sm_90) only")
    N = K = 1024
    a, w = _fp8((M, K)), _fp8((N, K), 1.0)
    sa, sb = _scales(M, N, "rowwise")
    cfg = fp8.select_config(M, N, K)
    c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    s_a, s_b = fp8._flat_scale(sa, M, "sa"), fp8._flat_scale(sb, N, "sb")
    if cfg.get("SWAP_AB"):
        compiled = fp8._launch(w, a.t(), s_b, s_a, None, c.t(), cfg, bias_along_m=True)
    else:
        compiled = fp8._launch(a, w.t(), s_a, s_b, None, c, cfg)
    ptx = compiled.asm["ptx"]
    wgmma = [line for line in ptx.splitlines() if "wgmma.mma_async" in line]
    assert wgmma, "no wgmma in the PTX"
    assert all("e4m3.e4m3" in line for line in wgmma), wgmma[:3]
    ref, mag = _gemm_ref64(a, w.t(), sa, sb, None)
    _assert_gemm_close(c, ref, mag, torch.bfloat16)
