"""RMSNorm fused with per-token e4m3 quantization, against "LlamaRMSNorm, then quantize_rows_fp8" in plain torch.

Exactness: on rows built so that mean(x^2) and rsqrt are exact whatever the summation order or rsqrt
implementation, the kernel must equal the unfused reference bit for bit (codes and scales). On random rows
it may differ where torch's summation order or rsqrt differs by an ulp: scales within a few ulps, a rare
code one e4m3 step away. On CPU the kernel runs in Triton's interpreter (fp32/fp16); bf16 on the GPU.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernopt.kernels import fp8_gemm
from kernopt.kernels import rmsnorm_quant as rq

E4M3 = torch.float8_e4m3fn
ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
EPS = 1e-6
FLOOR_SCALE = (torch.tensor(fp8_gemm.AMAX_FLOOR) * fp8_gemm.INV_FP8_MAX).item()  # in fp32, as computed


def exact_rows(M, K, dtype, gen=None):
    """Rows whose squares average to exactly 64 * 4^j (groups (+-8), (+-4, +-4, +-4, +-4, +-16), (0, 0, 0, +-16),
    shuffled, times 2^j): the sum of squares is an integer below 2^24 in any order, var + 1e-6 rounds back to
    var, and rsqrt(var) = 2^-(3 + j) exactly; the norm's output is weight * {0, +-1/2, +-1, +-2}. Row 1 is zero."""
    groups = [[8.0], [4.0, 4.0, 4.0, 4.0, 16.0], [0.0, 0.0, 0.0, 16.0]]
    rows = []
    for i in range(M):
        vals = []
        while len(vals) < K:
            fits = [g for g in groups if len(g) <= K - len(vals)]
            vals += fits[int(torch.randint(len(fits), (1,), generator=gen))]
        row = torch.tensor(vals)[torch.randperm(K, generator=gen)]
        row = row * torch.where(torch.rand(K, generator=gen) < 0.5, -1.0, 1.0) * 2.0 ** (i % 4)
        rows.append(row * 0 if i == 1 else row)
    return torch.stack(rows).to(device=DEV, dtype=dtype)


def spread_weight(K, dtype, gen=None):
    """Random weights over six decades, so the quantized row hits e4m3's subnormals as well as +-448."""
    w = torch.randn(K, generator=gen) * torch.logspace(-3, 2, K)[torch.randperm(K, generator=gen)]
    return w.to(device=DEV, dtype=dtype)


def poisoned(M, K):
    q = torch.full((M, K), float("nan"), device=DEV).to(E4M3)
    s = torch.full((M, 1), float("nan"), device=DEV)
    return q, s


def assert_bitwise(got, want):
    (q, s), (q_ref, s_ref) = got, want
    assert q.dtype == E4M3 and s.dtype == torch.float32 and s.shape == s_ref.shape and q.shape == q_ref.shape
    assert not torch.isnan(s).any() and not torch.isnan(q.float()).any(), "an output was never written"
    assert torch.equal(s, s_ref), f"scales differ: max rel {((s - s_ref).abs() / s_ref).max().item():.3g}"
    diff = q.view(torch.uint8) != q_ref.view(torch.uint8)
    assert not diff.any(), f"{int(diff.sum())} codes differ, first at {diff.nonzero()[0].tolist()}"


def assert_at_most_one_step(q, s, q_ref, s_ref, max_fraction):
    """Scales within 8 ulps; differing codes adjacent (one e4m3 step) and rare."""
    assert not torch.isnan(s).any() and not torch.isnan(q.float()).any(), "an output was never written"
    assert ((s - s_ref).abs() <= s_ref * 2.0 ** -20).all(), ((s - s_ref).abs() / s_ref).max()
    a, b = q.float(), q_ref.float()
    diff = a != b
    # one e4m3 step at magnitude m is 2^(floor(log2 m) - 3) for normals, 2^-9 below 2^-6
    m = torch.maximum(a.abs(), b.abs()).clamp(min=2.0 ** -6)
    step = torch.exp2(torch.floor(torch.log2(m)) - 3)
    assert ((a - b).abs() <= step).all(), "a code is more than one e4m3 step off"
    assert diff.float().mean().item() <= max_fraction, f"{int(diff.sum())} of {diff.numel()} codes differ"


# --------------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: bit for bit on exact rows
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                             (torch.float16, torch.float32), (torch.float32, torch.float16)])
@pytest.mark.parametrize("M,K,block_k", [(5, 55, None), (4, 205, 64), (3, 1001, 256), (2, 7, None)])
def test_exact_rows_match_unfused_reference_bitwise(M, K, block_k, x_dtype, w_dtype):
    x = exact_rows(M, K, x_dtype)
    w = spread_weight(K, w_dtype)
    cfg = None if block_k is None else {"BLOCK_K": block_k, "num_warps": 4}
    got = rq.rmsnorm_quant_fp8(x, w, EPS, config=cfg, out=poisoned(M, K))
    want = fp8_gemm.quantize_rows_fp8_ref(rq.rmsnorm_ref(x, w, EPS))  # the unfused graph
    assert_bitwise(got, want)
    assert_bitwise(got, rq.rmsnorm_quant_fp8_ref(x, w, EPS))
    assert got[1][1, 0].item() == FLOOR_SCALE  # the zero row: floor scale
    assert not got[0][1].float().any()


@settings(max_examples=8, deadline=None)
@given(M=st.integers(1, 6), K=st.integers(1, 300), block_k=st.sampled_from([None, 16, 64]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2 ** 16))
def test_exact_rows_random_shapes(M, K, block_k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x, w = exact_rows(M, K, dtype, gen), spread_weight(K, dtype, gen)
    cfg = None if block_k is None else {"BLOCK_K": block_k, "num_warps": 4}
    assert_bitwise(rq.rmsnorm_quant_fp8(x, w, EPS, config=cfg, out=poisoned(M, K)),
                   fp8_gemm.quantize_rows_fp8_ref(rq.rmsnorm_ref(x, w, EPS)))


# --------------------------------------------------------------------------------------------------
# random rows: at most an ulp of the norm apart, so at most one e4m3 step
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,block_k", [(9, 77, None), (6, 333, 128)])
def test_random_rows_close_to_reference(M, K, block_k, dtype):
    x = (torch.randn(M, K, device=DEV) * torch.logspace(-2, 2, M, device=DEV)[:, None]).to(dtype)
    w = (1 + 0.3 * torch.randn(K, device=DEV)).to(dtype)
    cfg = None if block_k is None else {"BLOCK_K": block_k, "num_warps": 4}
    q, s = rq.rmsnorm_quant_fp8(x, w, EPS, config=cfg, out=poisoned(M, K))
    q_ref, s_ref = rq.rmsnorm_quant_fp8_ref(x, w, EPS)
    assert_at_most_one_step(q, s, q_ref, s_ref, max_fraction=0.01)
    # and the dequantized row is the float64 norm within e4m3's rounding
    x64 = x.double()
    y64 = w.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    assert ((q.double() * s.double() - y64).abs() <= y64.abs() * 2.0 ** -3 + s.double() * 2.0 ** -9).all()


def test_zero_and_saturating_rows():
    K = 40
    x = torch.zeros(3, K, device=DEV)
    x[1] = torch.linspace(-1, 1, K, device=DEV)
    x[2, 5] = 1e15  # one huge value: its norm output is sqrt(K) * w, the row max, which maps to 448 exactly
    w = torch.ones(K, device=DEV)
    q, s = rq.rmsnorm_quant_fp8(x, w, EPS, out=poisoned(3, K))
    q_ref, s_ref = rq.rmsnorm_quant_fp8_ref(x, w, EPS)
    assert s[0, 0].item() == FLOOR_SCALE and not q[0].float().any()
    assert q[2, 5].float().item() == 448.0 and not torch.cat([q[2, :5], q[2, 6:]]).float().any()
    assert_at_most_one_step(q, s, q_ref, s_ref, max_fraction=0.05)


def test_empty_shapes_and_strided_input():
    w = torch.ones(16, device=DEV)
    q, s = rq.rmsnorm_quant_fp8(torch.zeros(0, 16, device=DEV), w, EPS)
    assert q.shape == (0, 16) and s.shape == (0, 1)
    x = torch.zeros(6, 32, device=DEV)
    x[:, ::2] = exact_rows(6, 16, torch.float32)
    x = x[:, ::2]  # column stride 2
    assert_bitwise(rq.rmsnorm_quant_fp8(x, w, EPS), rq.rmsnorm_quant_fp8_ref(x, w, EPS))


def test_input_errors():
    x, w = torch.randn(4, 16, device=DEV), torch.ones(16, device=DEV)
    with pytest.raises(ValueError, match="2-D"):
        rq.rmsnorm_quant_fp8(x[None], w, EPS)
    with pytest.raises(ValueError, match=r"weight must be \[16\]"):
        rq.rmsnorm_quant_fp8(x, torch.ones(15, device=DEV), EPS)
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        rq.rmsnorm_quant_fp8(x.to(torch.float64), w, EPS)
    with pytest.raises(ValueError, match="out must be"):
        rq.rmsnorm_quant_fp8(x, w, EPS, out=poisoned(4, 15))


def test_select_config_covers_llama_rows_in_one_block():
    for K in (2048, 4096, 8192):
        cfg = rq.select_config(1, K)
        assert cfg["BLOCK_K"] >= K and cfg["BLOCK_K"] * 1 // (cfg["num_warps"] * 32) <= 32
    assert rq.select_config(1, 40000)["BLOCK_K"] == 16384


def test_custom_op_keeps_leading_dims(monkeypatch):
    import kernopt.ops  # noqa: F401  (registers torch.ops.kernopt.*)

    x = exact_rows(6, 48, torch.float32).reshape(2, 3, 48)
    w = spread_weight(48, torch.float32)
    want = fp8_gemm.quantize_rows_fp8_ref(rq.rmsnorm_ref(x, w, EPS))
    for cpu_mode in ("", "reference"):
        monkeypatch.setenv("KERNOPT_CPU", cpu_mode)
        q, s = torch.ops.kernopt.rmsnorm_quant_fp8(x, w, EPS)
        assert q.shape == (2, 3, 48) and s.shape == (6, 1)
        assert_bitwise((q, s), (want[0], want[1].reshape(6, 1)))


# --------------------------------------------------------------------------------------------------
# GPU: bf16, Llama widths, the CUDA reference (torch's CUDA mean and rsqrt)
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K", [(1, 4096), (37, 2048), (300, 4096), (64, 8192), (5, 20000)])
def test_gpu_llama_widths(M, K, dtype):
    x = (torch.randn(M, K, device=DEV) * 4).to(dtype)
    w = (1 + 0.3 * torch.randn(K, device=DEV)).to(dtype)
    q, s = rq.rmsnorm_quant_fp8(x, w, 1e-5, out=poisoned(M, K))
    q_ref, s_ref = fp8_gemm.quantize_rows_fp8_ref(rq.rmsnorm_ref(x, w, 1e-5))
    assert_at_most_one_step(q, s, q_ref, s_ref, max_fraction=2e-3)
    xe = exact_rows(M, min(K, 4101), dtype)
    we = spread_weight(xe.shape[1], dtype)
    assert_bitwise(rq.rmsnorm_quant_fp8(xe, we, 1e-5),
                   fp8_gemm.quantize_rows_fp8_ref(rq.rmsnorm_ref(xe, we, 1e-5)))
