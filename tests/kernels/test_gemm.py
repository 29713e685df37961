"""kernels/gemm.py against a float64 reference: every activation, bias, swiglu, odd shapes, split-K, strides.

On CPU the kernel runs under Triton's interpreter (fp16 / fp32 only); bf16 and the Llama shapes are
`gpu` tests.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernopt.kernels import gemm as G
from kernopt.tolerance import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTS = G.ACTIVATIONS
# Small tiles so that odd shapes span several M/N/K tiles and every edge mask is exercised.
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2}


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
    with pytest.raises(ValueError, match=match):
        G.gemm(x, w, **kw)


# --------------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------------
def _valid(cfg):
    G._check_config(cfg)
    assert set(cfg) == set(G.CONFIG_KEYS), cfg
    assert cfg["num_warps"] in (1, 2, 4, 8, 16) and 1 <= cfg["num_stages"] <= 6


@pytest.mark.parametrize("M", [1, 4, 16, 17, 64, 65, 256, 257, 4096, 16384])
@pytest.mark.parametrize("N,K", [(14336, 4096), (4096, 14336), (6144, 4096), (17, 19)])
@pytest.mark.parametrize("activation", ACTS)
def test_tables_are_valid(M, N, K, activation):
    for dtype in G.DTYPES:
        cfg = G.select_config(M, N, K, activation, dtype)
        _valid(cfg)
        if M <= 16:
            assert cfg["BLOCK_M"] == 16, "decode rows fit one 16-row tile"
        if M > 256 and dtype != torch.float32:
            assert cfg["BLOCK_M"] >= 128 and cfg["num_warps"] == 8
    cands = G.candidate_configs(M, N, K, activation)
    assert 2 <= len(cands) <= 12
    for c in cands:
        _valid(c)
    reason = G.prefer_triton(M, N, K, activation, torch.bfloat16)
    assert reason is None or (isinstance(reason, str) and f"M={M}" in reason)


def test_split_k_fills_the_gpu_only_when_needed():
    # Down projection at decode: N/64 = 64 tiles, too few for 132 SMs -> split K.
    assert G.select_config(1, 4096, 14336, "none", torch.bfloat16)["SPLIT_K"] > 1
    # Gate/up at decode: 224 tiles already cover the SMs.
    assert G.select_config(1, 14336, 4096, "swiglu", torch.bfloat16)["SPLIT_K"] == 1
    # A short K is never split below 8 K-tiles per split.
    assert G.select_config(1, 64, 512, "none", torch.bfloat16)["SPLIT_K"] == 1


def test_prefer_triton_expectations():
    assert G.prefer_triton(16, 14336, 4096, "swiglu", torch.bfloat16) is None
    assert "cuBLAS" in G.prefer_triton(4096, 4096, 4096, "none", torch.bfloat16)
    assert "fp32" in G.prefer_triton(16, 14336, 4096, "swiglu", torch.float32)


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
