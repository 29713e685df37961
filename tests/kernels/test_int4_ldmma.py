"""int4_gemm impl "ldmma" (kernels/int4_ldmma.py, Gluon): words loaded straight into mma.sync's A registers, a
program per 32 columns over all of K, warps taking K chunks round robin.

Gluon kernels do not run under Triton's interpreter: on CPU this file checks the relabelling by emulation (the
kernel's reshapes and permutations repeated in torch) and the refusals; tests/kernels/test_sm90_compile.py compiles
the kernel for sm_90a. The kernel itself runs in the tests marked gpu, against the float64 reference.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernopt.kernels import int4_ldmma as ld
from kernopt.kernels.int4_gemm import candidate_configs, int4_gemm, int4_gemm_ref
from kernopt.tolerance import assert_close

# the int4 tests' shared operands and checks (tests/kernels/int4_cases.py; importlib mode keeps tests/ off sys.path)
_spec = importlib.util.spec_from_file_location("kernopt_tests_int4_cases", Path(__file__).with_name("int4_cases.py"))
int4_cases = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(int4_cases)
check_extreme_codes_fractional_zeros_strided_x = int4_cases.check_extreme_codes_fractional_zeros_strided_x
_expected, _run, _weights = int4_cases.expected, int4_cases.run, int4_cases.weights


@pytest.mark.parametrize("bn", [16, 32, 64])
def test_rows_map_to_distinct_columns(bn):
    """The MMA's rows are a permutation of the program's columns (each column read and written once), and the
    scales' relabelling moves column column_of_row(n) to row n."""
    cols = ld.column_of_row(torch.arange(bn), bn)
    assert sorted(cols.tolist()) == list(range(bn))
    assert cols[:8].tolist() == [bn // 8 * r for r in range(8)]  # rows 0..7: lanes 0, 4, .., 28's first column
    assert torch.equal(ld._emulate_rows(torch.arange(bn)), cols)


@pytest.mark.parametrize("g,bn,ks,rows", [(32, 32, None, 0), (64, 64, None, 0), (128, 32, None, 0), (128, 64, 64, 0),
                                          (128, 16, None, 0), (256, 32, 128, 0), (256, 64, 32, 0), (128, 32, None, 1),
                                          (64, 32, None, 1), (256, 32, 128, 1)])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_ldmma_emulation_matches_reference(g, bn, ks, rows, M):
    """The kernel's relabelling, emulated in float64 (A rows and K positions, x^T's K positions, the rows' scales,
    the rows written back to their columns; rows 1: the ring's conflict-free word-row order): equal to the reference up to its float32 dequantization (a wrong
    position would be off by the outputs' own size, ~1)."""
    torch.manual_seed(g + M)
    N, K = 3 * bn, 2 * max(g, 128)
    qweight, scales, _ = _weights(N, K, g, False, "cpu", torch.float32)
    x = torch.randn(M, K, dtype=torch.float64)
    expected = int4_gemm_ref(x, qweight, scales.double(), None, g)
    torch.testing.assert_close(ld.ldmma_emulate(x, qweight, scales, g, bn, ks, rows), expected, rtol=1e-5,
                               atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(word=st.integers(-2**31, 2**31 - 1), ks=st.sampled_from([32, 64, 128]), bn=st.sampled_from([16, 32, 64]),
       rows=st.sampled_from([0, 1]))
def test_ldmma_orders_agree(word, ks, bn, rows):
    """Position p of every A row holds nibble k(p) of that row's words and position p of x^T holds x[k(p)], the
    same k(p) for every row: a permutation of the chunk's K (distinct and extreme words; either word-row order)."""
    rows = rows if ks >= 64 else 0
    words = torch.full((ks // 8, bn), word, dtype=torch.int32)
    words[:, 1::2] = 0x76543210
    words[-1] = -0x01234568
    a = ld._emulate_a(words, ks, rows) + 8.0                                  # [bn rows, ks] codes
    order = ld._emulate_b(torch.arange(ks, dtype=torch.float64)[None], ks, rows)[:, 0].long()
    assert sorted(order.tolist()) == list(range(ks))
    codes = ((words.t().long().repeat_interleave(8, 1) >> ((torch.arange(ks) % 8) * 4)) & 0xF).double()  # [bn, ks]
    assert torch.equal(a, codes[ld.column_of_row(torch.arange(bn), bn)][:, order])


def test_ldmma_candidates_at_small_m_only():
    everything = [c for c in candidate_configs(1, 14336, 4096, 128) if c["impl"] == "ldmma"]
    assert not [c for c in everything if c.get("SPLIT_K", 1) > 1]  # 448 programs at N = 14336: no split
    assert {c.get("SPLIT_K", 1) for c in candidate_configs(4, 4096, 14336, 128) if c["impl"] == "ldmma"} == {1, 2, 4}
    cands = [c for c in everything if not c.get("STAGES")]
    ring = [c for c in everything if c.get("STAGES")]
    assert {c["num_warps"] for c in cands} == {4, 8, 16} and {c["AHEAD"] for c in cands} == {1, 2}
    assert {c["num_warps"] for c in ring} == {4, 8} and all(c["ROWS"] == 1 and c["BLOCK_N"] == 32 for c in ring)
    assert {c["ROWS"] for c in candidate_configs(1, 4096, 4096, 32) if c.get("STAGES")} == {0}  # 32-wide chunks
    assert {c["BLOCK_N"] for c in cands} == {16, 32}
    assert {c["BLOCK_K"] for c in cands} == {64, 128}
    assert {c["BLOCK_K"] for c in candidate_configs(1, 4096, 4096, 32) if c["impl"] == "ldmma"} == {32}
    assert {c["BLOCK_M"] for c in candidate_configs(16, 4096, 4096, 128) if c["impl"] == "ldmma"} == {16}
    assert not [c for c in candidate_configs(17, 4096, 4096, 128) if c["impl"] == "ldmma"]
    assert not [c for c in candidate_configs(4, 4096, 4096, 16) if c["impl"] == "ldmma"]


def test_ldmma_refusals():
    """Inputs the kernel cannot take get a clear error, never a wrong answer."""
    qweight, scales, zeros = _weights(64, 512, 128, True, "cpu")
    x = torch.randn(2, 512, dtype=torch.bfloat16)
    assert ld.ldmma_supported(x, qweight, 128) is None
    assert "16-bit" in ld.ldmma_supported(x.float(), qweight, 128)
    assert "multiple of 32" in ld.ldmma_supported(x, qweight, 16)
    assert "N-contiguous" in ld.ldmma_supported(x, qweight.t().contiguous().t().contiguous(), 128)
    with pytest.raises(ValueError, match="ldmma"):  # a CPU launch: Gluon has no interpreter, or the bad config
        int4_gemm(x, qweight, scales, zeros, 128, config={"impl": "ldmma", "BLOCK_M": 8, "num_warps": 4})
    out = torch.empty(2, 64, dtype=torch.bfloat16)
    for bad in ({"STAGES": 4, "BLOCK_N": 64}, {"STAGES": 7}, {"STAGES": 2, "num_warps": 16, "BLOCK_K": 256},
                {"STAGES": 3, "SPS": 2, "num_warps": 16}, {"SPS": 2}, {"SPLIT_K": 3}, {"SPLIT_K": 2, "STAGES": 3}):
        with pytest.raises(ValueError, match="STAGES"):  # refused before any launch
            ld.int4_ldmma(x, qweight, scales, zeros, None, out, 128, bad)


@pytest.mark.parametrize("bn", [16, 32, 64])
def test_ldmma_tile_round_trip_and_placement(bn):
    """ldmma_tile puts word (n, j) at [n // bn, j, n % bn] (a program's words one contiguous block), ldmma_untile
    inverts it; N not a multiple of the tile is refused."""
    torch.manual_seed(bn)
    qweight, _, _ = _weights(3 * bn, 256, 128, False, "cpu")
    tiled = ld.ldmma_tile(qweight, bn)
    assert tiled.shape == (3, 32, bn) and tiled.is_contiguous()
    n, j = torch.randint(0, 3 * bn, (50,)), torch.randint(0, 32, (50,))
    assert torch.equal(tiled[n // bn, j, n % bn], qweight[n, j])
    back = ld.ldmma_untile(tiled)
    assert torch.equal(back, qweight) and back.stride(0) == 1
    assert ld.ldmma_supported(torch.randn(1, 256, dtype=torch.bfloat16), tiled, 128) is None
    with pytest.raises(ValueError, match="multiple"):
        ld.ldmma_tile(qweight[:bn + 4], bn)


@pytest.mark.gpu
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("M", [1, 6])
def test_ldmma_gpu_tiled_words(M, asym):
    """The same kernel on ldmma_tile's format (stride_qt: a program's words one block), 16 / 32 / 64-column tiles,
    even and ragged K chunk counts, one and two chunks ahead, bias; NaN-poisoned out."""
    g, N = 128, 1024 + 64
    for K, warps, ahead in ((4096, 4, 1), (11 * 128, 8, 2), (4096, 16, 1)):
        qweight, scales, zeros = _weights(N, K, g, asym, "cuda", torch.bfloat16)
        x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
        bias = torch.randn(N, dtype=torch.bfloat16, device="cuda")
        expected = _expected(x, qweight, scales, zeros, g, bias)
        for bn in (16, 32, 64):
            cfg = {"BLOCK_M": 8, "BLOCK_N": bn, "BLOCK_K": 128, "AHEAD": ahead, "num_warps": warps}
            out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
            ld.int4_ldmma(x, ld.ldmma_tile(qweight, bn), scales, zeros, bias, out, g, cfg)
            assert_close(out, expected, torch.bfloat16, scale=2.0)
        with pytest.raises(ValueError, match="tiles"):
            ld.int4_ldmma(x, ld.ldmma_tile(qweight, 32), scales, zeros, bias, out, g, {**cfg, "BLOCK_N": 64})


@pytest.mark.gpu
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("M", [1, 13])
def test_ldmma_gpu_split_k(M, asym):
    """SPLIT_K 2 / 4 / 8: K slices per column block finished by the last program to arrive (its slots summed, the
    counter re-armed: every config runs twice and both results are checked), N = 1000 (a ragged last tile), K = 11
    chunks (slices of unequal chunk counts, one empty at 8) and 32 chunks (the unmasked loads), bias, 4 / 8 warps,
    one and two chunks ahead; NaN-poisoned out."""
    g, dtype, N = 128, torch.bfloat16, 1000
    for K in (11 * 128, 4096):
        qweight, scales, zeros = _weights(N, K, g, asym, "cuda", dtype)
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        bias = torch.randn(N, dtype=dtype, device="cuda")
        expected = _expected(x, qweight, scales, zeros, g, bias)
        for warps, split, ahead in ((4, 2, 1), (4, 4, 2), (8, 2, 1), (4, 8, 1)):
            cfg = {"impl": "ldmma", "BLOCK_M": 8 if M <= 8 else 16, "BLOCK_N": 32, "BLOCK_K": 128, "AHEAD": ahead,
                   "SPLIT_K": split, "num_warps": warps}
            for _ in range(2):
                assert_close(_run(x, qweight, scales, zeros, g, cfg, bias), expected, dtype, scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("M", [1, 6, 16])
def test_ldmma_gpu_tma_ring(M, asym):
    """The TMA-ring form (STAGES: the words by TMA into shared memory, read back in the A fragment's layout) on
    both word formats: N = 1000 (TMA's zero fill past N) with K = 32 chunks, N = 1088 with K = 11 chunks (the last
    step's box past K: zero fill, or in the tiled format the next tile's words times zero x and scales), rings of
    2..6 slots over 4 / 8 / 16 warps, 32- to 128-wide chunks, both word-row orders (ROWS), one or two steps a slot
    (SPS: with K = 11 chunks on 4 warps, 3 steps, the last slot's second step is skipped), bias; NaN-poisoned
    out."""
    g, dtype = 128, torch.bfloat16
    for N, K in ((1000, 4096), (1088, 11 * 128)):
        qweight, scales, zeros = _weights(N, K, g, asym, "cuda", dtype)
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        bias = torch.randn(N, dtype=dtype, device="cuda")
        expected = _expected(x, qweight, scales, zeros, g, bias)
        bm = 8 if M <= 8 else 16
        for warps, stages, ks, rows, sps in ((4, 3, 128, 0, 1), (8, 4, 128, 1, 1), (16, 2, 128, 0, 1),
                                             (4, 6, 64, 1, 1), (4, 4, 32, 0, 1), (4, 3, 128, 1, 2), (8, 2, 64, 1, 2)):
            cfg = {"impl": "ldmma", "BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": ks, "STAGES": stages, "ROWS": rows,
                   "SPS": sps, "num_warps": warps}
            assert_close(_run(x, qweight, scales, zeros, g, cfg, bias), expected, dtype, scale=2.0)
            if N % 32 == 0:
                out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
                ld.int4_ldmma(x, ld.ldmma_tile(qweight), scales, zeros, bias, out, g, cfg)
                assert_close(out, expected, dtype, scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16])
def test_ldmma_gpu_candidates(M, asym, dtype):
    """Every ldmma candidate (and 16- and 64-column programs) at M within one 8-row tile or a 16-row one, bf16 and
    fp16 x, zero points or not, N = 1000 (a ragged last program), K = 11 chunks (warps with unequal chunk counts and
    step counts not multiples of the loop's 2 or 3), bias, NaN-poisoned out."""
    g, N, K = 128, 1000, 11 * 128
    qweight, scales, zeros = _weights(N, K, g, asym, "cuda", dtype)
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    bias = torch.randn(N, dtype=dtype, device="cuda")
    expected = _expected(x, qweight, scales, zeros, g, bias)
    cands = [c for c in candidate_configs(M, 14336, 4096, g) if c["impl"] == "ldmma"]
    assert cands
    if dtype == torch.float16:  # the fp16 unpack differs only in its constants
        cands = cands[:2]
    for cfg in cands + [{**cands[0], "BLOCK_N": 64}, {**cands[0], "BLOCK_N": 16}]:
        assert_close(_run(x, qweight, scales, zeros, g, cfg, bias), expected, dtype, scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("g,asym", [(32, True), (64, False), (256, True), (512, False)])
@pytest.mark.parametrize("M", [2, 13])
def test_ldmma_gpu_group_sizes(M, g, asym):
    """Groups of 32 / 64 (a chunk is one group) and 256 / 512 (several chunks per group), K = 3 groups, a row tile
    past M, 4 and 16 warps, one and two chunks ahead, a strided bias."""
    dtype = torch.bfloat16
    N, K = 4096 + 64, 3 * g
    qweight, scales, zeros = _weights(N, K, g, asym, "cuda", dtype)
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    bias = torch.randn(2 * N, dtype=dtype, device="cuda")[::2]  # a strided bias (int4_gemm makes it contiguous)
    expected = _expected(x, qweight, scales, zeros, g, bias)
    for warps, ahead in ((4, 1), (4, 2), (16, 1)):
        cfg = {"impl": "ldmma", "BLOCK_M": 16, "num_warps": warps, "AHEAD": ahead}
        assert_close(_run(x, qweight, scales, zeros, g, cfg, bias), expected, dtype, scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1000, 4096])
def test_ldmma_gpu_int32_zeros(N):
    """Integer zero points stored as int32 (GPTQ-style graphs hand them so), masked (N = 1000) and unmasked loads."""
    g, K, M = 128, 1024, 3
    qweight, scales, zeros = _weights(N, K, g, True, "cuda")
    zi = zeros.to(torch.int32)
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    cfg = {"impl": "ldmma", "BLOCK_M": 8, "num_warps": 4}
    assert_close(_run(x, qweight, scales, zi, g, cfg, None), _expected(x, qweight, scales, zeros, g, None),
                 torch.bfloat16, scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("asym", [True, False])
def test_ldmma_gpu_extreme_codes_fractional_zeros_strided_x(asym, graph_replays):
    """int4_cases.check_extreme_codes_fractional_zeros_strided_x on 4 warps (every warp's chunks and every column
    exist: the unmasked loads), 5 rows replayed."""
    check_extreme_codes_fractional_zeros_strided_x({"impl": "ldmma", "BLOCK_M": 8, "num_warps": 4}, asym,
                                                   graph_replays, rows=5)


def test_table_picks_ldmma_only_where_it_runs_and_never_for_a_gated_row(monkeypatch):
    """The table's ldmma pick needs a launch the kernel takes (_table_ldmma: CUDA, ldmma_supported); a gated one-row
    launch keeps the PAIRS GEMV (its SwiGLU epilogue is fused there); KERNOPT_INT4_LDMMA=0 turns the pick off."""
    from kernopt.kernels import int4_gemm as q4

    qweight, scales, zeros = _weights(14336, 4096, 128, True, "cpu")
    x = torch.randn(1, 4096, dtype=torch.bfloat16)
    assert not q4._table_ldmma(x, qweight, 128)  # a CPU tensor: Gluon has no interpreter
    assert q4.resolve_config(x, qweight, scales, zeros, 128, None)["impl"] == "gemv2"
    monkeypatch.setattr(q4, "_table_ldmma", lambda *a: True)
    assert q4.resolve_config(x, qweight, scales, zeros, 128, None)["impl"] == "ldmma"
    assert q4.resolve_config(x, qweight, scales, zeros, 128, None, gated=True)["impl"] == "gemv2"
    x4 = torch.randn(4, 4096, dtype=torch.bfloat16)
    assert q4.resolve_config(x4, qweight, scales, zeros, 128, None, gated=True)["impl"] == "ldmma"
    monkeypatch.setenv(q4.LDMMA_ENV, "0")
    assert q4.resolve_config(x, qweight, scales, zeros, 128, None)["impl"] == "gemv2"


def test_table_splits_ldmma_only_at_the_long_k_shape():
    """K14336 N4096 (llama's down_proj) takes the 4-way split-K ldmma at M <= 8 (sweeps/ldmma_split); K = 4096 stays
    unsplit, M > 8 and other group sizes leave ldmma."""
    from kernopt.kernels import int4_gemm as q4

    bf16 = torch.bfloat16
    for M in (1, 4, 8):
        cfg = q4.select_config(M, 4096, 14336, 128, x_dtype=bf16)
        assert (cfg["impl"], cfg.get("SPLIT_K"), cfg["num_warps"]) == ("ldmma", 4, 4)
        assert q4.select_config(M, 4096, 14336, 128, symmetric=True, x_dtype=bf16) == cfg
        assert q4.select_config(M, 4096, 4096, 128, x_dtype=bf16).get("SPLIT_K", 1) == 1
        assert q4.select_config(M, 4096, 14336, 128, x_dtype=torch.float16)["impl"] != "ldmma"
        assert q4.select_config(M, 4096, 14336, 128, x_dtype=bf16, ldmma=False)["impl"] != "ldmma"
    assert q4.select_config(16, 4096, 14336, 128, x_dtype=bf16)["impl"] != "ldmma"
    assert q4.select_config(1, 4096, 14336, 64, x_dtype=bf16)["impl"] != "ldmma"
    assert q4.select_config(1, 4096, 8192, 128, x_dtype=bf16)["impl"] != "ldmma"
