"""int4_gemm impl "wgr" (kernels/int4_wgmma.py, Gluon): swap-AB wgmma with the weight unpacked into the register operand.

Gluon kernels do not run under Triton's interpreter, so on CPU this file checks the kernel's K-order bookkeeping by
emulation (`wgr_emulate` repeats the kernel's joins, reshapes and permutations of the words and of x in torch: if
the two orders disagreed, the products would pair the wrong x with each nibble), the config plumbing and the
refusals; tests/kernels/test_sm90_compile.py compiles the kernel for sm_90a. The kernel itself runs in the tests
marked gpu, against the float64 reference.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernopt.kernels import int4_wgmma as wg
from kernopt.kernels import workspace
from kernopt.kernels.int4_gemm import candidate_configs, int4_gemm, int4_gemm_ref
from kernopt.tolerance import assert_close

# the int4 tests' shared operands and checks (tests/kernels/int4_cases.py; importlib mode keeps tests/ off sys.path)
_spec = importlib.util.spec_from_file_location("kernopt_tests_int4_cases", Path(__file__).with_name("int4_cases.py"))
int4_cases = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(int4_cases)
check_extreme_codes_fractional_zeros_strided_x = int4_cases.check_extreme_codes_fractional_zeros_strided_x
_expected, _run, _weights = int4_cases.expected, int4_cases.run, int4_cases.weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g,asym", [(32, True), (64, False), (128, True), (128, False), (256, True)])
def test_wgr_emulation_matches_reference(dtype, g, asym):
    """The kernel's arithmetic, emulated: per step the unpacked (q - z) in the unpack's order against x in the x^T
    store's order, scaled per group, bias; within the output dtype's tolerance of the float64 reference."""
    torch.manual_seed(g)
    N, K, M = 40, 3 * max(g, 128), 5
    qweight, scales, zeros = _weights(N, K, g, asym, "cpu", dtype)
    x = torch.randn(M, K, dtype=dtype)
    bias = torch.randn(N, dtype=dtype)
    out = wg.wgr_emulate(x, qweight, scales, zeros, g, bias)
    assert out.dtype == dtype
    assert_close(out, int4_gemm_ref(x.double(), qweight, scales, zeros, g, bias.double()), dtype)


@settings(max_examples=25, deadline=None)
@given(word=st.integers(-2**31, 2**31 - 1), ks=st.sampled_from([32, 64, 128]))
def test_wgr_orders_agree(word, ks):
    """Position p of the unpacked operand holds nibble k(p) of its row and position p of the x tile holds x[k(p)],
    for the same k(p) = wgr_k_order (a permutation of the step's K), extreme and random words alike."""
    order = wg.wgr_k_order(ks)
    assert sorted(order.tolist()) == list(range(ks))
    words = torch.tensor([[word] * (ks // 8), [(word * 7 + 3) % 2**31] * (ks // 8)], dtype=torch.int64)
    words[:, -1] = 0x76543210
    codes = torch.bitwise_and(torch.bitwise_right_shift(words.repeat_interleave(8, 1),
                                                        (torch.arange(ks) % 8) * 4), 0xF)
    assert torch.equal(wg._emulate_operand(words, ks), codes[:, order])
    x = torch.arange(ks, dtype=torch.float32)[None]
    assert torch.equal(wg._emulate_x(x, ks)[0].long(), order)


@settings(max_examples=200, deadline=None)
@given(spt=st.integers(1, 120), tiles=st.integers(1, 300), p=st.integers(1, 700))
def test_wgr_stream_k_partition(spt, tiles, p):
    """Stream-K: the programs' step ranges [p W // P, (p + 1) W // P) partition the W steps, each tile's programs are
    counted as the kernel counts them (the range of the programs holding its first and last step), and the
    launcher's workspace (MAXC partials per tile) holds them all."""
    W = spt * tiles
    P = min(p, W)
    counts, most = wg.sk_partition(W, P, spt)
    ranges = [(c * W // P, (c + 1) * W // P) for c in range(P)]
    assert ranges[0][0] == 0 and ranges[-1][1] == W and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for t in range(tiles):
        meet = [c for c, (lo, hi) in enumerate(ranges) if lo < (t + 1) * spt and hi > t * spt]
        assert counts[t] == len(meet) and meet == list(range(meet[0], meet[0] + len(meet)))
    assert most <= min(P, -(-spt // max(1, W // P)) + 1)


def test_wgr_in_small_m_candidates_only_for_groups_of_32_and_more():
    for M in (1, 4, 16):
        wgr = [c for c in candidate_configs(M, 14336, 4096, 128) if c["impl"] == "wgr"]
        assert wgr and all(c["BLOCK_M"] == (8 if M <= 8 else 16) and c["BLOCK_K"] == 128 for c in wgr)
        assert all(c["SPLIT_K"] >= 1 for c in wgr)
    assert not [c for c in candidate_configs(1, 4096, 4096, 16) if c["impl"] == "wgr"]
    assert {c["BLOCK_M"] for c in candidate_configs(64, 4096, 4096, 128) if c["impl"] == "wgr"} == {64}
    assert {c["BLOCK_M"] for c in candidate_configs(17, 4096, 4096, 128) if c["impl"] == "wgr"} == {32}
    assert not [c for c in candidate_configs(65, 4096, 4096, 128) if c["impl"] == "wgr"]


WGR = {"impl": "wgr", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4, "num_stages": 4}


def test_wgr_refusals(monkeypatch):
    """Inputs the kernel cannot take get a clear error, never a wrong answer."""
    dtype = torch.bfloat16
    qweight, scales, zeros = _weights(64, 256, 128, False, "cpu", dtype)
    x = torch.randn(2, 256, dtype=dtype)
    assert wg.wgr_supported(x, qweight, 128) is None
    assert "float16 / bfloat16" in wg.wgr_supported(x.float(), qweight, 128)
    assert "group_size" in wg.wgr_supported(x, qweight, 16)
    assert "N-contiguous" in wg.wgr_supported(x, qweight.contiguous(), 128)  # K-contiguous words
    q60, s60, _ = _weights(60, 256, 128, False, "cpu", dtype)
    assert wg.wgr_supported(x, q60, 128) is None  # N = 60: rows of 240 bytes, 16-byte aligned
    q62, _, _ = _weights(62, 256, 128, False, "cpu", dtype)
    assert "16-byte" in wg.wgr_supported(x, q62, 128)
    with pytest.raises(ValueError, match="N-contiguous"):
        int4_gemm(x, qweight.contiguous(), scales, None, 128, config=WGR)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="interpreter"):
        int4_gemm(x, qweight, scales, None, 128, config=WGR)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="BLOCK_M 8 / 16"):
        wg.int4_wgr_gemm(x, qweight, scales, scales, scales, torch.empty(2, 64, dtype=dtype), 2, 64, 256, 128, 1,
                         256, False, False, {**WGR, "BLOCK_M": 4}, None)
    # benchmarks/wgr_ablate.py's knob exists only in the stream-K PARAM_TMA kernel
    stream = {**WGR, "BLOCK_M": 8, "STREAM": 1, "SPLIT_K": 1}
    for cfg in ({**stream, "WS": 1}, {**stream, "PARAM_TMA": 0}):
        with pytest.raises(ValueError, match="ablation"):
            wg.int4_wgr_gemm(x, qweight, scales, scales, scales, torch.empty(2, 64, dtype=dtype), 2, 64, 256, 128, 1,
                             256, False, False, cfg, None, _ablate=1)


def _check_twice(cands, x, qweight, scales, zeros, g, bias):
    """Each config right twice in a row (the second call reads re-armed split-K counters); counters back at 0."""
    expected = _expected(x, qweight, scales, zeros, g, bias)
    for cfg in cands:
        for _ in range(2):
            assert_close(_run(x, qweight, scales, zeros, g, cfg, bias), expected, x.dtype, scale=2.0)
    for buf in workspace._BUFFERS.values():
        assert not buf.any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("M", [1, 16])
def test_wgr_gpu_candidates(M, asym, dtype):
    """Every wgr candidate of the --tune sweep at M = 1 (BLOCK_M 8) and 16, group 128, bf16 and fp16 x (the 0x4300 /
    0x6400 exponents), zero points or not, N = 1000 (a ragged last tile), K = 5 steps (splits of unequal length),
    bias, NaN-poisoned out; plus split 1."""
    g, N, K = 128, 1000, 640
    qweight, scales, zeros = _weights(N, K, g, asym, "cuda", dtype)
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    bias = torch.randn(N, dtype=dtype, device="cuda")
    cands = [c for c in candidate_configs(M, 14336, 4096, g) if c["impl"] == "wgr"]
    assert any(c.get("STREAM") for c in cands)
    if dtype == torch.float16:  # the fp16 unpack differs only in its constants: two tiles of each kernel
        cands = cands[:2] + [c for c in cands if c.get("STREAM")][:3] + [c for c in cands if c.get("WS")][:1]
    _check_twice(cands + [{**cands[0], "SPLIT_K": 1}], x, qweight, scales, zeros, g, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("g,asym", [(32, True), (64, False), (256, True)])
@pytest.mark.parametrize("M", [3, 9, 17])
def test_wgr_gpu_group_sizes_and_row_tiles(M, g, asym):
    """Groups of 32 / 64 (a step is one group) and 256 (two steps per group), M within one 8- or 16-row tile or
    across two (17), K = 5 groups, split 1 and 3, bias; stream-K with and without X_DOT (x permuted per 32 columns)."""
    dtype = torch.bfloat16
    N, K = 1000, 5 * g
    qweight, scales, zeros = _weights(N, K, g, asym, "cuda", dtype)
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    bias = torch.randn(N, dtype=dtype, device="cuda")
    base = {**WGR, "BLOCK_M": 8 if M <= 8 else 16, "BLOCK_K": min(g, 128), "BLOCK_N": 128}
    stream = {**base, "STREAM": 1, "SPLIT_K": 1}
    # stream-K with 1 program per SM (tiles of several programs) and 40 (programs of a few steps, many idle)
    _check_twice([base, {**base, "SPLIT_K": 3}, {**stream, "CTAS_PER_SM": 1}, {**stream, "CTAS_PER_SM": 40},
                  {**stream, "CTAS_PER_SM": 3, "PARAM_TMA": 1},
                  {**stream, "CTAS_PER_SM": 3, "PARAM_TMA": 1, "X_DOT": 1},
                  {**stream, "CTAS_PER_SM": 3, "WS": 1},
                  {**stream, "CTAS_PER_SM": 40, "WS": 1, "num_stages": 2}], x, qweight, scales, zeros, g, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("M", [17, 40, 64])
def test_wgr_gpu_wide_row_tiles(M, asym):
    """32- and 64-row tiles (the M = 17..64 candidates): every candidate, N = 1000, K = 5 steps, bias, twice."""
    dtype, g, N, K = torch.bfloat16, 128, 1000, 640
    qweight, scales, zeros = _weights(N, K, g, asym, "cuda", dtype)
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    bias = torch.randn(N, dtype=dtype, device="cuda")
    cands = [c for c in candidate_configs(M, 14336, 4096, g) if c["impl"] == "wgr"]
    assert cands
    _check_twice(cands, x, qweight, scales, zeros, g, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("asym", [True, False])
def test_wgr_gpu_extreme_codes_fractional_zeros_strided_x(asym, graph_replays):
    """int4_cases.check_extreme_codes_fractional_zeros_strided_x on a split-K wgr config (16 rows replayed)."""
    check_extreme_codes_fractional_zeros_strided_x({**WGR, "BLOCK_N": 128, "SPLIT_K": 2}, asym, graph_replays)


def test_table_takes_wgr_only_where_it_runs():
    """int4_gemm lets the table pick wgr only for a CUDA launch with weights, scales and zeros TMA can read."""
    from kernopt.kernels.int4_gemm import _table_wgr

    qweight, scales, zeros = _weights(64, 256, 128, True, "cpu", torch.bfloat16)
    assert not _table_wgr(torch.randn(4, 256, dtype=torch.bfloat16), qweight, scales, zeros, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("M", [2, 4, 16])
def test_wgr_gpu_table_picks_and_fallbacks(M, asym):
    """The table's wgr picks (config=None, as the ops call it) at a shape where it takes wgr, and the fallback when
    the scales are stored K-contiguous (rows TMA cannot read as they are): both against the float64 reference."""
    from kernopt.kernels.int4_gemm import _table_wgr

    dtype, g, N, K = torch.bfloat16, 128, 4104, 2048
    qweight, scales, zeros = _weights(N, K, g, asym, "cuda", dtype)
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    bias = torch.randn(N, dtype=dtype, device="cuda")
    assert _table_wgr(x, qweight, scales, zeros, g)
    for s in (scales, scales.contiguous()):
        assert _table_wgr(x, qweight, s, zeros, g) == (s is scales)
        for _ in range(2):
            assert_close(_run(x, qweight, s, zeros, g, None, bias), _expected(x, qweight, s, zeros, g, bias), dtype,
                         scale=2.0)


@pytest.mark.parametrize("M,K", [(1, 32), (3, 4096), (5, 1056), (64, 160)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_x_dot_kernel_matches_permutation(M, K, dtype):
    """X_DOT's copy (the Triton kernel, interpreter on CPU) equals the reshape / X_PERM permutation, on row widths that
    are not multiples of its 1024-column block and on a strided x, output poisoned first."""
    torch.manual_seed(M * K)
    base = torch.randn(M, K + 7, dtype=dtype)
    x = base[:, 3:3 + K]  # row stride K + 7: not contiguous
    ref = wg.wgr_x_dot_ref(x)
    out = wg.wgr_x_dot(x, out=torch.full((M, K), float("nan"), dtype=dtype))
    assert torch.equal(out, ref)
    # the permutation is wgr_k_order's: position p of each 32-chunk holds column k(p)
    order = wg.wgr_k_order(32)
    assert torch.equal(ref[:, :32], x[:, order])
