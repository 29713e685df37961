"""kernels/gemm.py against a float64 reference: every activation, bias, swiglu, odd shapes, split-K, strides,
for the three kernels (the tiled tl.dot kernel, the decode gemv and the decode swap-AB kernel).

On CPU the kernel runs under Triton's interpreter (fp16 / fp32 only); bf16 and the Llama shapes are
`gpu` tests.
"""
import math

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from kernopt.kernels import gemm as G
from kernopt.kernels import workspace
from kernopt.tolerance import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTS = G.ACTIVATIONS
# Small tiles so that odd shapes span several M/N/K tiles and every edge mask is exercised.
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2}
# The gemv with small tiles: several n-blocks, several K blocks per slice, rows split over programs.
GEMV = {"impl": "gemv", "BLOCK_M": 2, "BLOCK_N": 8, "BLOCK_K": 16, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1}
# The swap-AB kernel with small tiles: several n-blocks and K blocks; BLOCK_M 16 is its decode tile.
SWAPAB = {"impl": "swapab", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1, "num_warps": 4,
          "num_stages": 3}


def make_inputs(M, N, K, dtype, activation, with_bias, device=DEVICE):
    x = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / math.sqrt(K)).to(dtype)
    w_up = (torch.randn(N, K, device=device) / math.sqrt(K)).to(dtype) if activation == "swiglu" else None
    bias = torch.randn(N, device=device).to(dtype) if with_bias else None
    return x, w, bias, w_up


def expected64(x, w, bias, w_up, activation):
    """The reference computed in float64 from the same (already rounded) inputs."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return G.gemm_ref(d(x), d(w), d(bias), d(w_up), activation)


def poisoned(M, N, dtype, device=DEVICE):
    return torch.full((M, N), float("nan"), dtype=dtype, device=device)


def run_and_check(M, N, K, dtype, activation, with_bias, config):
    x, w, bias, w_up = make_inputs(M, N, K, dtype, activation, with_bias)
    out = poisoned(M, N, dtype)
    y = G.gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=config, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    assert_close(y, expected64(x, w, bias, w_up, activation), dtype)


# --------------------------------------------------------------------------------------------------
# Interpreter (or GPU) correctness
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K", [(1, 17, 19), (5, 70, 64), (33, 17, 100), (33, 70, 19)])
@pytest.mark.parametrize("activation,with_bias", [(a, b) for a in ACTS for b in (False, True)
                                                  if not (a == "swiglu" and b)])
def test_matches_float64(dtype, M, N, K, activation, with_bias):
    run_and_check(M, N, K, dtype, activation, with_bias, SMALL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("K,block_k,split", [(100, 16, 3), (64, 16, 2), (64, 32, 4), (19, 16, 2)])
@pytest.mark.parametrize("activation,with_bias", [("none", True), ("gelu", False), ("swiglu", False)])
def test_split_k(dtype, K, block_k, split, activation, with_bias):
    # (64, 32, 4): two K tiles over four splits, so two splits are empty and must contribute zeros.
    cfg = {**SMALL, "BLOCK_K": block_k, "SPLIT_K": split, "GROUP_M": 1}
    run_and_check(5, 70, K, dtype, activation, with_bias, cfg)


# --------------------------------------------------------------------------------------------------
# The gemv (decode rows): same epilogues and semantics as the tiled kernel
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K,block_m", [(1, 37, 100, 1), (3, 21, 50, 4), (5, 9, 33, 2), (8, 40, 64, 8),
                                           (7, 17, 16, 16)])
@pytest.mark.parametrize("activation,with_bias", [(a, b) for a in ACTS for b in (False, True)
                                                  if not (a == "swiglu" and b)])
def test_gemv_matches_float64(dtype, M, N, K, block_m, activation, with_bias):
    # N not a multiple of BLOCK_N, K not a multiple of BLOCK_K (except 16 and 64), M below, at and above
    # BLOCK_M; M=5 over BLOCK_M=2 gives three row blocks, the last one partial.
    run_and_check(M, N, K, dtype, activation, with_bias, {**GEMV, "BLOCK_M": block_m})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("K,block_k,split", [(100, 16, 3), (64, 16, 2), (64, 32, 4), (19, 16, 2), (200, 32, 16),
                                             (47, 16, 64)])
@pytest.mark.parametrize("activation,with_bias", [("none", True), ("gelu_tanh", True), ("swiglu", False)])
def test_gemv_split_k(dtype, K, block_k, split, activation, with_bias):
    """Single-pass split-K; (64, 32, 4), (200, 32, 16) and (47, 16, 64) ask for more slices than there
    are K blocks (the launcher clamps), (100, 16, 3) and (19, 16, 2) end on a partial K block."""
    run_and_check(4, 37, K, dtype, activation, with_bias, {**GEMV, "BLOCK_K": block_k, "SPLIT_K": split})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("K,split", [(100, 1), (100, 3), (200, 2)])
@pytest.mark.parametrize("activation,with_bias", [("none", True), ("swiglu", False)])
def test_gemv_staged_loop(dtype, K, split, activation, with_bias):
    """One row through the 3-stage loop (LOAD_STAGES; cp.async on a GPU): 7 / 13 K blocks of 16, a partial last
    block, with and without split-K, one weight with bias and SwiGLU's two, odd N."""
    cfg = {**GEMV, "BLOCK_M": 1, "SPLIT_K": split, "num_stages": 3}
    run_and_check(1, 37, K, dtype, activation, with_bias, cfg)


@pytest.mark.parametrize("activation", ["silu", "swiglu"])
def test_gemv_twice_rearms_counters(activation):
    """Two calls in a row on fresh inputs through the same arrival counters (the last slice of each tile
    must have re-armed its counter, else the second call finishes early or never), then all back at 0."""
    cfg = {**GEMV, "BLOCK_M": 4, "SPLIT_K": 3}
    for M, N in ((3, 45), (6, 45)):  # the second call also has twice the tiles
        run_and_check(M, N, 70, torch.float16, activation, activation != "swiglu", cfg)
    assert workspace._BUFFERS and all(not buf.any() for buf in workspace._BUFFERS.values())


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("impl", ["gemv", "swapab"])
def test_single_pass_strided_inputs_and_out(impl, activation, split):
    M, N, K = 3, 37, 45
    # x: a row-strided view into a wider buffer; w (and w_up): .T of [K, N] buffers (K not contiguous);
    # out: a column slice of a NaN buffer, whose other columns must stay untouched.
    x = torch.randn(M, K + 11, device=DEVICE, dtype=torch.float16)[:, 3:K + 3]
    w = (torch.randn(K, N, device=DEVICE) / math.sqrt(K)).half().T
    w_up = (torch.randn(K, N, device=DEVICE) / math.sqrt(K)).half().T if activation == "swiglu" else None
    bias = torch.randn(N, device=DEVICE).half() if activation != "swiglu" else None
    assert not x.is_contiguous() and w.stride() == (1, N)
    buf = poisoned(M, N + 9, torch.float16)
    out = buf[:, 5:N + 5]
    cfg = {**(GEMV if impl == "gemv" else SWAPAB), "SPLIT_K": split}
    G.gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=cfg, out=out)
    assert_close(out, expected64(x, w, bias, w_up, activation), torch.float16)
    assert torch.isnan(buf[:, :5]).all() and torch.isnan(buf[:, N + 5:]).all(), "wrote outside out"


def test_gemv_zero_k_and_fp32_bias():
    # K = 0: no K block at all; the epilogue still applies to the bias (an fp32 bias on fp16 inputs).
    x0 = torch.randn(3, 0, device=DEVICE, dtype=torch.float16)
    w0 = torch.randn(24, 0, device=DEVICE, dtype=torch.float16)
    b = torch.randn(24, device=DEVICE)
    y = G.gemm(x0, w0, bias=b, activation="silu", config=GEMV, out=poisoned(3, 24, torch.float16))
    assert_close(y, torch.nn.functional.silu(b.double()).expand(3, 24), torch.float16)
    x, w, _, _ = make_inputs(2, 30, 33, torch.float16, "gelu", False)
    b = torch.randn(30, device=DEVICE)
    y = G.gemm(x, w, bias=b, activation="gelu", config={**GEMV, "SPLIT_K": 2}, out=poisoned(2, 30, torch.float16))
    assert_close(y, expected64(x, w, b, None, "gelu"), torch.float16)


def test_gemv_large_activation_inputs_saturate():
    M, N, K = 2, 16, 16
    x = torch.full((M, K), 8.0, device=DEVICE)
    x[1] = -8.0
    w = torch.full((N, K), 2.0, device=DEVICE)  # pre-activations +-256
    for act in ("silu", "gelu", "gelu_tanh"):
        y = G.gemm(x, w, activation=act, config=GEMV, out=poisoned(M, N, torch.float32))
        assert_close(y, expected64(x, w, None, None, act), torch.float32)


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("activation", ["none", "swiglu"])
def test_gemv_candidates_and_table_entries(M, activation):
    """Every gemv config the sweep tries (and the table's gemv row) at an odd small shape: the real tiles
    (BLOCK_K 256..2048, K = 1100 ends on a partial block) and their split choices (clamped to K blocks)."""
    N, K = 40, 1100
    x, w, bias, w_up = make_inputs(M, N, K, torch.float16, activation, activation == "none")
    ref = expected64(x, w, bias, w_up, activation)
    cands = [c for c in G.candidate_configs(M, 4096, 14336, activation) if c["impl"] == "gemv"]
    cands.append(G._gemv_config(M, N, K, activation, torch.float16))
    assert len(cands) >= 3 and any(c["SPLIT_K"] > 1 for c in cands)
    for cfg in cands:
        y = G.gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=cfg, out=poisoned(M, N, torch.float16))
        assert_close(y, ref, torch.float16)


@settings(max_examples=10, deadline=None)
@given(M=st.integers(1, 9), N=st.integers(1, 40), K=st.integers(1, 70), act=st.sampled_from(ACTS),
       with_bias=st.booleans(), split=st.sampled_from([1, 2, 5]), block_m=st.sampled_from([1, 2, 8]))
def test_gemv_property_random_shapes(M, N, K, act, with_bias, split, block_m):
    torch.manual_seed(M * 10007 + N * 101 + K)
    run_and_check(M, N, K, torch.float16, act, with_bias and act != "swiglu",
                  {**GEMV, "SPLIT_K": split, "BLOCK_M": block_m})


# --------------------------------------------------------------------------------------------------
# The swap-AB kernel (decode rows on the tensor core's N side): same epilogues and semantics
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K,block_m", [(1, 37, 100, 16), (3, 21, 50, 16), (7, 40, 64, 16), (16, 17, 33, 16),
                                           (13, 9, 48, 32), (5, 70, 19, 16)])
@pytest.mark.parametrize("activation,with_bias", [(a, b) for a in ACTS for b in (False, True)
                                                  if not (a == "swiglu" and b)])
def test_swapab_matches_float64(dtype, M, N, K, block_m, activation, with_bias):
    # Odd M from 1 to 16 in one 16-row tile (and 13 rows in a 32-row one), N not a multiple of BLOCK_N
    # (9 < BLOCK_N: the weight rows wrap), K not a multiple of BLOCK_K except 64 and 48, 19 < 2 blocks.
    run_and_check(M, N, K, dtype, activation, with_bias, {**SWAPAB, "BLOCK_M": block_m})


def test_swapab_rows_over_several_programs():
    # M above BLOCK_M: row blocks are a grid dimension too (the kernel takes any M, the table uses M <= 16).
    run_and_check(35, 23, 40, torch.float16, "gelu", True, SWAPAB)
    run_and_check(35, 23, 40, torch.float16, "swiglu", False, {**SWAPAB, "SPLIT_K": 2})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("K,block_k,split", [(100, 16, 3), (64, 16, 2), (64, 32, 4), (19, 16, 2), (200, 32, 16),
                                             (47, 16, 64)])
@pytest.mark.parametrize("activation,with_bias", [("none", True), ("gelu_tanh", True), ("swiglu", False)])
def test_swapab_split_k(dtype, K, block_k, split, activation, with_bias):
    """Single-pass split-K; (64, 32, 4), (200, 32, 16) and (47, 16, 64) ask for more slices than there
    are K blocks (the launcher clamps), (100, 16, 3) and (19, 16, 2) end on a partial K block."""
    run_and_check(4, 37, K, dtype, activation, with_bias, {**SWAPAB, "BLOCK_K": block_k, "SPLIT_K": split})


@pytest.mark.parametrize("activation", ["silu", "swiglu"])
def test_swapab_twice_rearms_counters(activation):
    """Two calls in a row on fresh inputs through the same arrival counters (each tile's last slice must
    re-arm its counter, else the second call finishes early or never), then every counter is back at 0."""
    cfg = {**SWAPAB, "SPLIT_K": 3}
    for M, N in ((3, 45), (6, 77)):  # the second call has more tiles
        run_and_check(M, N, 70, torch.float16, activation, activation != "swiglu", cfg)
    assert workspace._BUFFERS and all(not buf.any() for buf in workspace._BUFFERS.values())


def test_swapab_column_major_x_and_out():
    # x as the .T of a [K, M] buffer (K contiguous along dim 0 of x^T: the kernel's natural x^T layout
    # becomes strided) and out as the .T of an [N, M] buffer.
    M, N, K = 5, 30, 40
    x = torch.randn(K, M, device=DEVICE, dtype=torch.float16).T
    w = (torch.randn(N, K, device=DEVICE) / math.sqrt(K)).half()
    bias = torch.randn(N, device=DEVICE).half()
    out = poisoned(N, M, torch.float16).T
    G.gemm(x, w, bias=bias, activation="silu", config={**SWAPAB, "SPLIT_K": 2}, out=out)
    assert_close(out, expected64(x, w, bias, None, "silu"), torch.float16)


def test_swapab_zero_k_and_fp32_bias():
    # K = 0: no K block at all; the epilogue still applies to the bias (an fp32 bias on fp16 inputs).
    x0 = torch.randn(3, 0, device=DEVICE, dtype=torch.float16)
    w0 = torch.randn(24, 0, device=DEVICE, dtype=torch.float16)
    b = torch.randn(24, device=DEVICE)
    for split in (1, 4):
        y = G.gemm(x0, w0, bias=b, activation="silu", config={**SWAPAB, "SPLIT_K": split},
                   out=poisoned(3, 24, torch.float16))
        assert_close(y, torch.nn.functional.silu(b.double()).expand(3, 24), torch.float16)
    x, w, _, _ = make_inputs(2, 30, 33, torch.float16, "gelu", False)
    b = torch.randn(30, device=DEVICE)
    y = G.gemm(x, w, bias=b, activation="gelu", config={**SWAPAB, "SPLIT_K": 2}, out=poisoned(2, 30, torch.float16))
    assert_close(y, expected64(x, w, b, None, "gelu"), torch.float16)


def test_swapab_large_activation_inputs_saturate():
    M, N, K = 2, 16, 16
    x = torch.full((M, K), 8.0, device=DEVICE)
    x[1] = -8.0
    w = torch.full((N, K), 2.0, device=DEVICE)  # pre-activations +-256
    for act in ("silu", "gelu", "gelu_tanh"):
        y = G.gemm(x, w, activation=act, config=SWAPAB, out=poisoned(M, N, torch.float32))
        assert_close(y, expected64(x, w, None, None, act), torch.float32)


@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("activation", ["none", "swiglu"])
def test_swapab_candidates_and_table_entries(M, activation):
    """Every swapab config the sweep tries (and the table's swapab row) at an odd small shape: the real
    tiles (BLOCK_N 64/128, BLOCK_K 64..256, K = 1100 ends on a partial block) and their splits."""
    N, K = 70, 1100
    x, w, bias, w_up = make_inputs(M, N, K, torch.float16, activation, activation == "none")
    ref = expected64(x, w, bias, w_up, activation)
    cands = [c for c in G.candidate_configs(M, 6144, 4096, activation) if c["impl"] == "swapab"]
    cands.append(G._swapab_config(M, N, K, activation, torch.float16))
    assert len(cands) >= 5 and any(c["SPLIT_K"] > 1 for c in cands) and any(c["SPLIT_K"] == 1 for c in cands)
    for cfg in cands:
        y = G.gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=cfg, out=poisoned(M, N, torch.float16))
        assert_close(y, ref, torch.float16)


@settings(max_examples=10, deadline=None)
@given(M=st.integers(1, 16), N=st.integers(1, 40), K=st.integers(1, 70), act=st.sampled_from(ACTS),
       with_bias=st.booleans(), split=st.sampled_from([1, 2, 5]), block_n=st.sampled_from([16, 32]))
def test_swapab_property_random_shapes(M, N, K, act, with_bias, split, block_n):
    torch.manual_seed(M * 10007 + N * 101 + K)
    run_and_check(M, N, K, torch.float16, act, with_bias and act != "swiglu",
                  {**SWAPAB, "SPLIT_K": split, "BLOCK_N": block_n})


@pytest.mark.parametrize("M", [1, 16, 33, 100, 300])
@pytest.mark.parametrize("activation", ["none", "swiglu"])
def test_default_config(M, activation):
    # config=None goes through select_config; every M bucket of the table is hit.
    x, w, bias, w_up = make_inputs(M, 40, 48, torch.float16, activation, activation == "none")
    y = G.gemm(x, w, bias=bias, w_up=w_up, activation=activation)
    assert y.shape == (M, 40) and y.dtype == torch.float16
    assert_close(y, expected64(x, w, bias, w_up, activation), torch.float16)


@pytest.mark.parametrize("activation", ["silu", "swiglu"])
def test_strided_inputs_and_out(activation):
    M, N, K = 21, 37, 45
    # x: a row-strided view into a wider buffer; w (and w_up): .T of [K, N] buffers; out: a column slice.
    x = torch.randn(M, K + 11, device=DEVICE, dtype=torch.float16)[:, 3:K + 3]
    w = (torch.randn(K, N, device=DEVICE) / math.sqrt(K)).half().T
    w_up = (torch.randn(K, N, device=DEVICE) / math.sqrt(K)).half().T if activation == "swiglu" else None
    bias = torch.randn(N, device=DEVICE).half() if activation != "swiglu" else None
    assert not x.is_contiguous() and w.stride() == (1, N)
    buf = poisoned(M, N + 9, torch.float16)
    out = buf[:, 5:N + 5]
    G.gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=SMALL, out=out)
    assert_close(out, expected64(x, w, bias, w_up, activation), torch.float16)
    assert torch.isnan(buf[:, :5]).all() and torch.isnan(buf[:, N + 5:]).all(), "wrote outside out"


def test_fp32_bias_on_fp16_input():
    M, N, K = 9, 30, 33
    x, w, _, _ = make_inputs(M, N, K, torch.float16, "gelu_tanh", False)
    bias = torch.randn(N, device=DEVICE)
    y = G.gemm(x, w, bias=bias, activation="gelu_tanh", config=SMALL, out=poisoned(M, N, torch.float16))
    assert_close(y, expected64(x, w, bias, None, "gelu_tanh"), torch.float16)


def test_empty_and_zero_k():
    x = torch.randn(0, 32, device=DEVICE, dtype=torch.float16)
    w = torch.randn(24, 32, device=DEVICE, dtype=torch.float16)
    assert G.gemm(x, w).shape == (0, 24)
    # K = 0: the product is zeros, the epilogue still applies to the bias.
    x0 = torch.randn(3, 0, device=DEVICE, dtype=torch.float32)
    w0 = torch.randn(24, 0, device=DEVICE, dtype=torch.float32)
    b = torch.randn(24, device=DEVICE)
    y = G.gemm(x0, w0, bias=b, activation="silu", config=SMALL, out=poisoned(3, 24, torch.float32))
    assert_close(y, torch.nn.functional.silu(b.double()).expand(3, 24), torch.float32)


def test_large_activation_inputs_saturate():
    # Big |pre-activation| values: exp overflow must give the limits, never NaN.
    M, N, K = 4, 16, 16
    x = torch.full((M, K), 8.0, device=DEVICE)
    x[1] = -8.0
    w = torch.full((N, K), 2.0, device=DEVICE)  # pre-activations +-256
    for act in ("silu", "gelu", "gelu_tanh"):
        y = G.gemm(x, w, activation=act, config=SMALL, out=poisoned(M, N, torch.float32))
        assert_close(y, expected64(x, w, None, None, act), torch.float32)


@settings(max_examples=12, deadline=None)
@given(M=st.integers(1, 40), N=st.integers(1, 50), K=st.integers(1, 70), act=st.sampled_from(ACTS),
       with_bias=st.booleans(), split=st.sampled_from([1, 2]))
def test_property_random_shapes(M, N, K, act, with_bias, split):
    torch.manual_seed(M * 10007 + N * 101 + K)
    run_and_check(M, N, K, torch.float16, act, with_bias and act != "swiglu", {**SMALL, "SPLIT_K": split})


# --------------------------------------------------------------------------------------------------
# Validation: user mistakes are ValueErrors that say what is valid
# --------------------------------------------------------------------------------------------------
def _xw(M=4, N=8, K=16, dtype=torch.float16):
    return torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype)


def test_bad_activation_lists_valid_ones():
    x, w = _xw()
    for fn in (lambda: G.gemm(x, w, activation="relu"), lambda: G.gemm_ref(x, w, activation="relu"),
               lambda: G.prefer_triton(4, 8, 16, "relu", torch.float16)):
        with pytest.raises(ValueError) as e:
            fn()
        for name in ACTS:
            assert repr(name) in str(e.value)


@pytest.mark.parametrize("case,match", [
    ("k_mismatch", "K mismatch"),
    ("float64", "not supported"),
    ("dtype_mix", "differs"),
    ("swiglu_no_up", "needs w_up"),
    ("up_without_swiglu", "only used with"),
    ("swiglu_bias", "ambiguous"),
    ("up_shape", "must match"),
    ("bias_shape", "bias must be"),
    ("out_shape", "out must be"),
    ("out_dtype", "out must be"),
    ("x_3d", "expects x"),
    ("bad_block", "power of two"),
    ("unknown_key", "unknown"),
    ("bad_impl", "'tiled', 'gemv'"),
    ("gemv_bad_block_n", "power of two"),
    ("gemv_small_block_k", "power of two >= 16"),
])
def test_validation_errors(case, match):
    x, w = _xw()
    kw = {}
    if case == "k_mismatch":
        w = torch.randn(8, 15, dtype=torch.float16)
    elif case == "float64":
        x, w = x.double(), w.double()
    elif case == "dtype_mix":
        w = w.float()
    elif case == "swiglu_no_up":
        kw = {"activation": "swiglu"}
    elif case == "up_without_swiglu":
        kw = {"w_up": w.clone(), "activation": "silu"}
    elif case == "swiglu_bias":
        kw = {"w_up": w.clone(), "activation": "swiglu", "bias": torch.zeros(8, dtype=torch.float16)}
    elif case == "up_shape":
        kw = {"w_up": w[:4].clone(), "activation": "swiglu"}
    elif case == "bias_shape":
        kw = {"bias": torch.zeros(9, dtype=torch.float16)}
    elif case == "out_shape":
        kw = {"out": torch.empty(4, 9, dtype=torch.float16)}
    elif case == "out_dtype":
        kw = {"out": torch.empty(4, 8, dtype=torch.float32)}
    elif case == "x_3d":
        x = x[None]
    elif case == "bad_block":
        kw = {"config": {**SMALL, "BLOCK_N": 24}}
    elif case == "unknown_key":
        kw = {"config": {**SMALL, "BLOCK_Q": 16}}
    elif case == "bad_impl":
        kw = {"config": {**SMALL, "impl": "gemv2"}}
    elif case == "gemv_bad_block_n":
        kw = {"config": {**GEMV, "BLOCK_N": 12}}
    elif case == "gemv_small_block_k":
        kw = {"config": {**GEMV, "BLOCK_K": 8}}
    with pytest.raises(ValueError, match=match):
        G.gemm(x, w, **kw)


# --------------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------------
def _valid(cfg):
    G._check_config(cfg)
    assert set(cfg) == set(G.CONFIG_KEYS), cfg
    assert cfg["impl"] in G.IMPLS and "impl=" + cfg["impl"] in G.format_config(cfg)
    assert cfg["num_warps"] in (1, 2, 4, 8, 16) and 1 <= cfg["num_stages"] <= 6


@pytest.mark.parametrize("M", [1, 4, 16, 17, 64, 65, 256, 257, 4096, 16384])
@pytest.mark.parametrize("N,K", [(14336, 4096), (4096, 14336), (6144, 4096), (17, 19)])
@pytest.mark.parametrize("activation", ACTS)
def test_tables_are_valid(M, N, K, activation):
    for dtype in G.DTYPES:
        cfg = G.select_config(M, N, K, activation, dtype)
        _valid(cfg)
        if M <= 16 and cfg["impl"] == "tiled":
            assert cfg["BLOCK_M"] == 16, "decode rows fit one 16-row tile"
        if M > 256 and dtype != torch.float32:
            assert cfg["BLOCK_M"] >= 128 and cfg["num_warps"] == 8
        if M <= 16:
            gemv = G._gemv_config(M, N, K, activation, dtype)
            _valid(gemv)
            assert gemv["impl"] == "gemv" and M <= gemv["BLOCK_M"] <= 16, "all decode rows in one program"
            # Several x rows: BLOCK_K spans 2 KB of a weight row, so the 4 warps sit side by side along K
            # (the layout in which x needs no conversion); one row (any layout is conversion-free): the H200
            # sweep's best, 2 KB plain and 512 B for swiglu's two weights; 1 KB through the 3-stage loop for one
            # weight, unsplit over > 2 K blocks (_GEMV_STAGED).
            row_bytes = gemv["BLOCK_K"] * (torch.finfo(dtype).bits // 8)
            one_row = 512 if activation == "swiglu" else 1024 if gemv["num_stages"] == 3 else 2048
            assert row_bytes == (one_row if M == 1 else 2048) and gemv["num_warps"] == 4
            assert gemv["num_stages"] == 1 or (M == 1 and activation != "swiglu" and gemv["SPLIT_K"] == 1)
        if M <= 16 and dtype != torch.float32:
            sab = G._swapab_config(M, N, K, activation, dtype)
            _valid(sab)
            assert sab["impl"] == "swapab" and sab["BLOCK_M"] == 16 and sab["BLOCK_N"] % 64 == 0, \
                "decode rows are wgmma's n16, weight rows whole m64 units"
    cands = G.candidate_configs(M, N, K, activation)
    impls = {c["impl"] for c in cands}
    assert impls == ({"tiled", "gemv", "swapab"} if M <= 16 else {"tiled"}), \
        "the sweep measures the gemv and the swap-AB kernel at M <= 16"
    assert 2 <= len(cands) <= 32
    assert len({G.format_config(c) for c in cands}) == len(cands), "no candidate twice"
    for c in cands:
        _valid(c)
        if c["impl"] == "gemv":
            assert c["BLOCK_M"] == triton.next_power_of_2(M) and 1 <= c["SPLIT_K"] <= 16
        if c["impl"] == "swapab":
            assert c["BLOCK_M"] == 16 and c["BLOCK_N"] in (64, 128) and c["num_warps"] == 4
            assert 1 <= c["SPLIT_K"] <= 16 and 3 <= c["num_stages"] <= 6
    reason = G.prefer_triton(M, N, K, activation, torch.bfloat16)
    assert reason is None or (isinstance(reason, str) and f"M={M}" in reason)


def test_split_k_fills_the_gpu_only_when_needed():
    # Down projection at decode rows (the tiled kernel's M): N/64 = 64 tiles, too few for 132 SMs -> split K.
    assert G.select_config(4, 4096, 14336, "none", torch.bfloat16)["SPLIT_K"] > 1
    # Gate/up at decode: 224 tiles already cover the SMs.
    assert G.select_config(4, 14336, 4096, "swiglu", torch.bfloat16)["SPLIT_K"] == 1
    # A short K is never split below 8 K-tiles per split.
    assert G.select_config(4, 64, 512, "none", torch.bfloat16)["SPLIT_K"] == 1


def test_prefer_triton_expectations():
    assert G.prefer_triton(16, 14336, 4096, "swiglu", torch.bfloat16) is None
    assert "cuBLAS" in G.prefer_triton(4096, 4096, 4096, "none", torch.bfloat16)
    assert "fp32" in G.prefer_triton(16, 14336, 4096, "swiglu", torch.float32)


def test_gemv_runs_the_measured_rows_and_one_constant_moves_it(monkeypatch):
    # Measured (H200): the gemv at M=1, for plain GEMMs too; unmeasured M stays on the tiled kernel / cuBLAS.
    assert G.GEMV_MAX_M == 1
    for act in ("none", "swiglu"):
        assert G.select_config(1, 6144, 4096, act, torch.bfloat16) == G._gemv_config(1, 6144, 4096, act)
        assert G.prefer_triton(1, 6144, 4096, act, torch.bfloat16) is None
    assert G._gemv_config(1, 6144, 4096, "none")["SPLIT_K"] == 1  # the sweep's best at the Llama shapes
    assert G._gemv_config(1, 4096, 14336, "none")["SPLIT_K"] == 1
    # one weight, unsplit over > 2 K blocks: the pipelined 16 x 1024-byte tile (_GEMV_STAGED); swiglu, short K and
    # split launches keep the plain loop
    for N, K in ((6144, 4096), (4096, 14336), (4096, 4096)):
        cfg = G._gemv_config(1, N, K, "none", torch.bfloat16)
        assert (cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"], cfg["SPLIT_K"]) == (16, 512, 3, 1), (N, K, cfg)
    assert G._gemv_config(1, 14336, 4096, "swiglu")["num_stages"] == 1
    assert G._gemv_config(1, 2048, 2048, "none")["num_stages"] == 1  # split 2 at 512 columns: the 2048-byte tile
    assert G._gemv_config(1, 512, 14336, "none")["num_stages"] == 1
    for M in (4, 16):
        assert G.select_config(M, 14336, 4096, "swiglu", torch.bfloat16)["impl"] == "tiled"
        assert "cuBLAS" in G.prefer_triton(M, 6144, 4096, "none", torch.bfloat16)
    monkeypatch.setattr(G, "GEMV_MAX_M", 8)
    for M, act in ((1, "none"), (8, "swiglu"), (5, "gelu")):
        assert G.select_config(M, 6144, 4096, act, torch.bfloat16) == G._gemv_config(M, 6144, 4096, act)
        assert G.prefer_triton(M, 6144, 4096, act, torch.bfloat16) is None
    assert G.select_config(9, 6144, 4096, "swiglu", torch.bfloat16)["impl"] == "tiled"
    assert "cuBLAS" in G.prefer_triton(9, 6144, 4096, "none", torch.bfloat16)


def test_swapab_is_off_until_measured_and_one_constant_switches_it_on(monkeypatch):
    assert G.SWAPAB_MAX_M == 0
    for M in (4, 16):
        assert G.select_config(M, 14336, 4096, "swiglu", torch.bfloat16)["impl"] == "tiled"
        assert "cuBLAS" in G.prefer_triton(M, 6144, 4096, "none", torch.bfloat16)
    monkeypatch.setattr(G, "SWAPAB_MAX_M", 16)
    for M, act in ((2, "none"), (16, "swiglu"), (5, "gelu")):  # M=1 stays the gemv's (GEMV_MAX_M)
        assert G.select_config(M, 6144, 4096, act, torch.bfloat16) == G._swapab_config(M, 6144, 4096, act)
        assert G.prefer_triton(M, 6144, 4096, act, torch.bfloat16) is None
    assert G.select_config(17, 6144, 4096, "swiglu", torch.bfloat16)["impl"] == "tiled"
    assert G.select_config(4, 6144, 4096, "none", torch.float32)["impl"] == "tiled"  # fp32: not wgmma
    assert "cuBLAS" in G.prefer_triton(17, 6144, 4096, "none", torch.bfloat16)
    monkeypatch.setattr(G, "GEMV_MAX_M", 2)  # both on: the gemv keeps the rows it covers
    assert G.select_config(2, 6144, 4096, "none", torch.bfloat16)["impl"] == "gemv"
    assert G.select_config(3, 6144, 4096, "none", torch.bfloat16)["impl"] == "swapab"


def test_swapab_split_k_fills_the_gpu_only_when_needed():
    # Down projection at decode: 4096 / 64 = 64 output tiles -> split to ~4 programs per SM.
    assert G._swapab_config(1, 4096, 14336, "none")["SPLIT_K"] >= 8
    # QKV: 96 tiles -> split; gate/up: 224 tiles, fewer than 4 per SM -> still split, a little.
    assert G._swapab_config(1, 6144, 4096, "none")["SPLIT_K"] > 1
    assert 1 < G._swapab_config(1, 14336, 4096, "swiglu")["SPLIT_K"] <= 4
    # A wide output already fills the SMs; a short K keeps >= 4 K blocks per slice.
    assert G._swapab_config(1, 65536, 4096, "none")["SPLIT_K"] == 1
    assert G._swapab_config(1, 64, 512, "none")["SPLIT_K"] == 1


def test_gemv_split_k_fills_the_gpu_only_when_needed():
    # One program per SM is the target (the H200 sweep at M=1): the down projection's 4096 / 16 = 256
    # programs and gate/up's 14336 / 32 = 448 already cover the SMs.
    assert G._gemv_config(1, 4096, 14336, "none")["SPLIT_K"] == 1
    assert G._gemv_config(1, 14336, 4096, "swiglu")["SPLIT_K"] == 1
    # Few programs: split K, ...
    assert G._gemv_config(1, 512, 14336, "none")["SPLIT_K"] == 4  # 32 programs -> 128
    assert G._gemv_config(1, 512, 14336, "none", torch.bfloat16)["SPLIT_K"] == 4
    # ... but a short K keeps >= 2 K blocks per slice.
    assert G._gemv_config(1, 64, 1024, "none")["SPLIT_K"] == 1


# --------------------------------------------------------------------------------------------------
# GPU: bf16 at Llama-8B shapes, and every candidate config compiles and is correct
# --------------------------------------------------------------------------------------------------
LLAMA = [("swiglu", 4096, 14336, False), ("none", 14336, 4096, False), ("none", 4096, 6144, True),
         ("silu", 4096, 14336, True), ("gelu_tanh", 4096, 6144, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 256, 1000])
@pytest.mark.parametrize("activation,K,N,with_bias", LLAMA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama_shapes(M, activation, K, N, with_bias, dtype):
    x, w, bias, w_up = make_inputs(M, N, K, dtype, activation, with_bias, device="cuda")
    out = poisoned(M, N, dtype, "cuda")
    y = G.gemm(x, w, bias=bias, w_up=w_up, activation=activation, out=out)
    assert_close(y, expected64(x, w, bias, w_up, activation), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 256, 2048])
@pytest.mark.parametrize("activation", ["none", "swiglu"])
def test_gpu_candidate_configs(M, activation):
    K, N = 4096, 2048 + 64 + 3  # odd N: the last tile is partial
    x, w, bias, w_up = make_inputs(M, N, K, torch.bfloat16, activation, activation == "none", device="cuda")
    ref = expected64(x, w, bias, w_up, activation)
    for cfg in G.candidate_configs(M, N, K, activation):
        y = G.gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=cfg,
                   out=poisoned(M, N, torch.bfloat16, "cuda"))
        assert_close(y, ref, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_fp32_ieee():
    x, w, bias, _ = make_inputs(64, 300, 1000, torch.float32, "gelu", True, device="cuda")
    y = G.gemm(x, w, bias=bias, activation="gelu", out=poisoned(64, 300, torch.float32, "cuda"))
    assert_close(y, expected64(x, w, bias, None, "gelu"), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("activation,K,N,with_bias", LLAMA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gemv_llama_shapes(M, activation, K, N, with_bias, dtype):
    """The gemv's table rows (what GEMV_MAX_M would switch on) at the Llama-8B decode shapes, bf16 included."""
    x, w, bias, w_up = make_inputs(M, N, K, dtype, activation, with_bias, device="cuda")
    y = G.gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=G._gemv_config(M, N, K, activation, dtype),
               out=poisoned(M, N, dtype, "cuda"))
    assert_close(y, expected64(x, w, bias, w_up, activation), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("activation", ["none", "swiglu"])
def test_gpu_gemv_split_k_graph_replay(M, activation):
    """Single-pass split-K on the GPU: the down-projection shape splits K; two eager calls in a row, then
    CUDA-graph replays into a re-poisoned out (the counters must be re-armed by every call)."""
    N, K = 4096 + 3, 14336
    x, w, bias, w_up = make_inputs(M, N, K, torch.bfloat16, activation, activation == "none", device="cuda")
    ref = expected64(x, w, bias, w_up, activation)
    cfg = {**G._gemv_config(M, N, K, activation, torch.bfloat16), "SPLIT_K": 4}  # the table may not split
    out = poisoned(M, N, torch.bfloat16, "cuda")
    for _ in range(2):
        out.fill_(float("nan"))
        G.gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=cfg, out=out)
        assert_close(out, ref, torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        G.gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=cfg, out=out)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, ref, torch.bfloat16)
    assert all(not buf.any() for buf in workspace._BUFFERS.values())


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("activation,K,N,with_bias", LLAMA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_swapab_llama_shapes(M, activation, K, N, with_bias, dtype):
    """The swap-AB table row (what SWAPAB_MAX_M would switch on) at the Llama-8B decode shapes, bf16 included."""
    x, w, bias, w_up = make_inputs(M, N, K, dtype, activation, with_bias, device="cuda")
    cfg = G._swapab_config(M, N, K, activation, dtype)
    y = G.gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=cfg, out=poisoned(M, N, dtype, "cuda"))
    assert_close(y, expected64(x, w, bias, w_up, activation), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("activation,K,N,with_bias", LLAMA)
def test_gpu_swapab_candidates(M, activation, K, N, with_bias):
    """Every swapab candidate at the Llama-8B shapes with N + 3 rows (a partial last weight tile), bf16,
    a row-strided x; out poisoned per call."""
    N += 3
    x, w, bias, w_up = make_inputs(M, N, K, torch.bfloat16, activation, with_bias, device="cuda")
    x = torch.cat([x, torch.randn_like(x)], dim=1)[:, :K]  # row stride 2K
    ref = expected64(x, w, bias, w_up, activation)
    for cfg in [c for c in G.candidate_configs(M, N, K, activation) if c["impl"] == "swapab"]:
        y = G.gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=cfg,
                   out=poisoned(M, N, torch.bfloat16, "cuda"))
        assert_close(y, ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("activation", ["none", "swiglu"])
def test_gpu_swapab_split_k_graph_replay(M, activation):
    """Single-pass split-K on the GPU: two eager calls, then CUDA-graph replays into a re-poisoned out (the
    counters must be re-armed by every call), and the counters are all 0 at the end."""
    N, K = 4096 + 3, 14336
    x, w, bias, w_up = make_inputs(M, N, K, torch.bfloat16, activation, activation == "none", device="cuda")
    ref = expected64(x, w, bias, w_up, activation)
    cfg = G._swapab_config(M, N, K, activation, torch.bfloat16)
    assert cfg["SPLIT_K"] > 1
    out = poisoned(M, N, torch.bfloat16, "cuda")
    for _ in range(2):
        out.fill_(float("nan"))
        G.gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=cfg, out=out)
        assert_close(out, ref, torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        G.gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=cfg, out=out)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, ref, torch.bfloat16)
    assert all(not buf.any() for buf in workspace._BUFFERS.values())
