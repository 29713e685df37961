"""int4_gemm (gemv / tiled / gemv2 / tiled2 / tiled3 / dequant_cublas) vs a float64 reference on the dequantized weight.

Runs the Triton kernels under the interpreter on CPU (fp16 activations) and on the GPU when present.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernopt.kernels import workspace
from kernopt.kernels.int4_gemm import (candidate_configs, dequantize_int4, int4_dequantize, int4_gemm,
                                       int4_gemm_ref, select_config, silu_mul)
from kernopt.tolerance import assert_close, mismatch, rms


def _weights(N, K, g, asym, device, dtype=torch.float16):
    """Random int4 weights in kernopt's storage: logical [N, ...], stored N-contiguous."""
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=device).t()
    scales = (torch.rand(K // g, N, device=device) * 0.02 + 0.005).to(dtype).t()
    zeros = torch.randint(0, 16, (K // g, N), device=device).to(dtype).t() if asym else None
    return qweight, scales, zeros


def _expected(x, qweight, scales, zeros, g, bias=None):
    w = dequantize_int4(qweight, scales, zeros, g, torch.float64)
    y = x.double() @ w.t()
    return y + bias.double() if bias is not None else y


def _run(x, qweight, scales, zeros, g, cfg, bias=None):
    out = torch.full((x.shape[0], qweight.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    res = int4_gemm(x, qweight, scales, zeros, g, bias=bias, config=cfg, out=out)
    assert res is out
    return out


def _check_calls_and_rearmed_counters(device, cfg, M, N, K, g, asym):
    """fp16, bias, NaN-poisoned out against the float64 reference; with split-K a second call with new inputs on
    the same counters (the last slice must have re-armed them); every counter back at zero."""
    for _ in range(2 if cfg["SPLIT_K"] > 1 else 1):
        x = torch.randn(M, K, dtype=torch.float16, device=device)
        qweight, scales, zeros = _weights(N, K, g, asym, device)
        bias = torch.randn(N, dtype=torch.float16, device=device)
        out = _run(x, qweight, scales, zeros, g, cfg, bias=bias)
        assert_close(out, _expected(x, qweight, scales, zeros, g, bias), torch.float16)
    for buf in workspace._BUFFERS.values():
        assert not buf.any()


# Small explicit configs: several N blocks, a ragged last block, several K blocks per split.
GEMV = {"impl": "gemv", "BLOCK_M": 4, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4}
GEMV_SPLIT = {"impl": "gemv", "BLOCK_M": 2, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 3, "num_warps": 4}
TILED = {"impl": "tiled", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 2}
TILED_SPLIT = {"impl": "tiled", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2, "GROUP_M": 1}
DEQUANT = {"impl": "dequant_cublas", "BLOCK_N": 16, "BLOCK_K": 32}


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("cfg", [GEMV, GEMV_SPLIT, TILED, TILED_SPLIT, DEQUANT],
                         ids=["gemv", "gemv_splitk", "tiled", "tiled_splitk", "dequant"])
def test_int4_gemm_matches_reference(device, g, asym, cfg):
    M, N, K = (3, 37, 2 * 128) if cfg["impl"] == "gemv" else (19, 45, 2 * 128)
    x = torch.randn(M, K, dtype=torch.float16, device=device)
    qweight, scales, zeros = _weights(N, K, g, asym, device)
    out = _run(x, qweight, scales, zeros, g, cfg)
    assert_close(out, _expected(x, qweight, scales, zeros, g), torch.float16)


@pytest.mark.parametrize("bias", [False, True])
def test_dequant_cublas_writes_into_a_strided_out(device, bias):
    """dequant + cuBLAS writes its product straight into `out` (mm / addmm out=): a column slice of a wider
    NaN-poisoned buffer (as a grouped launch's part) gets the product, the columns around it stay untouched."""
    M, N, K, g = 19, 45, 256, 32
    x = torch.randn(M, K, dtype=torch.float16, device=device)
    qweight, scales, zeros = _weights(N, K, g, True, device)
    b = torch.randn(N, dtype=torch.float16, device=device) if bias else None
    wide = torch.full((M, N + 9), float("nan"), dtype=x.dtype, device=device)
    out = wide[:, 4:4 + N]
    assert int4_gemm(x, qweight, scales, zeros, g, bias=b, config=DEQUANT, out=out) is out
    assert_close(out, _expected(x, qweight, scales, zeros, g, b), torch.float16)
    assert torch.isnan(wide[:, :4]).all() and torch.isnan(wide[:, 4 + N:]).all()


# The experimental single-pass variants: split-K finished by the last K slice (SPLIT_K=3 gives a
# ragged last slice), gemv2 with and without the register prefetch, one row and several.
GEMV2 = {"impl": "gemv2", "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 3, "PREFETCH": 1}
GEMV2_ROWS = {"impl": "gemv2", "BLOCK_M": 4, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1, "PREFETCH": 0}
GEMV2_STAGED = {**GEMV2, "PREFETCH": 0, "num_stages": 3}  # the tl.range-pipelined loop (cp.async on a GPU)
# K blocks of several groups (zero and scale per word row): 2 groups of 32 per block with split-K, and a 256-wide
# block whose second half runs past K = 384 (masked rows), staged.
GEMV2_MULTI = {**GEMV2, "BLOCK_K": 64}
GEMV2_MULTI_TAIL = {**GEMV2, "BLOCK_K": 256, "SPLIT_K": 1, "PREFETCH": 0, "num_stages": 2}
# one nibble plane at a time (M = 1): prefetching with split-K, and staged over a multi-group block past K
GEMV2_PLANES = {**GEMV2, "PLANES": 1}
GEMV2_PLANES_MULTI = {**GEMV2_MULTI_TAIL, "PLANES": 1}
# packed word sums (M = 1; the interpreter runs its plain-Triton twin, the GPU test below the inline PTX)
GEMV2_PAIRS = {**GEMV2, "PAIRS": 1}
GEMV2_PAIRS_MULTI = {**GEMV2_MULTI_TAIL, "PAIRS": 1}
GEMV2_PAIRS_MULTI_SPLIT = {**GEMV2_MULTI, "PAIRS": 1}
# two K blocks prefetched (the last two prefetches of each slice fall past it: masked), fp32 path and PAIRS
GEMV2_DEEP = {**GEMV2, "PREFETCH": 2}
GEMV2_PAIRS_DEEP = {**GEMV2_PAIRS, "PREFETCH": 2}
GEMV2_PAIRS_DEEP_MULTI = {**GEMV2_PAIRS_MULTI_SPLIT, "PREFETCH": 2}
# PAIRS with x's next K block prefetched beside its words (masked past the slice), one group per block with a ragged
# split-K, two groups per block with split-K, and a 256-wide block running past K
GEMV2_PAIRS_PX = {**GEMV2_PAIRS, "PREFETCH_X": 1}
GEMV2_PAIRS_PX_MULTI_SPLIT = {**GEMV2_PAIRS_MULTI_SPLIT, "PREFETCH_X": 1}
GEMV2_PAIRS_PX_MULTI_TAIL = {**GEMV2_PAIRS_MULTI, "PREFETCH": 1, "num_stages": 1, "PREFETCH_X": 1}
TILED2 = {"impl": "tiled2", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 3, "GROUP_M": 2}


@pytest.mark.parametrize("cfg,g,asym", [
    pytest.param(cfg, g, asym, id=f"{name}-g{g}-{'asym' if asym else 'sym'}")
    for name, cfg, groups in (("gemv2", GEMV2, (32, 64, 128)), ("tiled2", TILED2, (32, 64, 128)),
                              ("gemv2_rows", GEMV2_ROWS, (64, 128)), ("gemv2_staged", GEMV2_STAGED, (32, 128)),
                              ("gemv2_multi", GEMV2_MULTI, (32,)), ("gemv2_multi_tail", GEMV2_MULTI_TAIL, (32, 128)),
                              ("gemv2_planes", GEMV2_PLANES, (32, 128)), ("gemv2_planes_multi", GEMV2_PLANES_MULTI, (32,)),
                              ("gemv2_pairs", GEMV2_PAIRS, (32, 64, 128)), ("gemv2_pairs_multi", GEMV2_PAIRS_MULTI, (32, 128)),
                              ("gemv2_pairs_multi_split", GEMV2_PAIRS_MULTI_SPLIT, (32,)),
                              ("gemv2_deep", GEMV2_DEEP, (32, 128)), ("gemv2_pairs_deep", GEMV2_PAIRS_DEEP, (32, 128)),
                              ("gemv2_pairs_deep_multi", GEMV2_PAIRS_DEEP_MULTI, (32,)),
                              ("gemv2_pairs_px", GEMV2_PAIRS_PX, (32, 64, 128)),
                              ("gemv2_pairs_px_multi_split", GEMV2_PAIRS_PX_MULTI_SPLIT, (32,)),
                              ("gemv2_pairs_px_multi_tail", GEMV2_PAIRS_PX_MULTI_TAIL, (32, 128)))
    for g in groups for asym in (True, False) if name != "gemv2_rows" or asym == (g == 128)])
def test_int4_gemm_single_pass_variants(device, g, asym, cfg):
    """Odd M/N, every group size, sym/asym, bias, NaN-poisoned out; with split-K a second call with new
    inputs on the same counters (the last slice must have re-armed them), and counters back at zero."""
    _check_calls_and_rearmed_counters(device, cfg, (1 if cfg["BLOCK_M"] == 1 else 3), 37, 384, g, asym)


def _swiglu_expected(x, qweight, scales, zeros, g, bias):
    """silu(gate) * up over the float64 product (gate rows then up rows), as the unfused ops compute it."""
    y = _expected(x, qweight, scales, zeros, g, bias)
    n = y.shape[-1] // 2
    return F.silu(y[:, :n]) * y[:, n:]


@pytest.mark.parametrize("cfg", [GEMV2_PAIRS, GEMV2, {**GEMV2, "SPLIT_K": 1}, GEMV2_PAIRS_PX_MULTI_TAIL,
                                 GEMV2_PAIRS_MULTI_SPLIT, TILED2, DEQUANT, None],
                         ids=["pairs_split3", "fp32_split3", "fp32_split1", "pairs_px_multi_tail", "pairs_multi_split",
                              "tiled2_fallback", "dequant_fallback", "table"])
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("M", [1, 3])
def test_int4_gemm_gated_swiglu(device, cfg, asym, M):
    """gated=True: silu(y[:, :N/2]) * y[:, N/2:] -> [M, N/2]; at one row through gemv2's epilogue (BLOCK_M 1), else
    the product then the two ops. Odd N/2 (a tile's gate and up halves ragged), K = 5 groups, bias, NaN-poisoned
    out, twice (re-armed split-K counters: every counter back at zero)."""
    g, n = 32, 37
    K = 5 * g
    for _ in range(2):
        qweight, scales, zeros = _weights(2 * n, K, g, asym, device)
        x = torch.randn(M, K, dtype=torch.float16, device=device)
        bias = torch.randn(2 * n, dtype=torch.float16, device=device)
        out = torch.full((M, n), float("nan"), dtype=x.dtype, device=device)
        res = int4_gemm(x, qweight, scales, zeros, g, bias=bias, config=cfg, out=out, gated=True)
        assert res is out
        assert_close(out, _swiglu_expected(x, qweight, scales, zeros, g, bias), torch.float16, scale=2.0)
    for buf in workspace._BUFFERS.values():
        assert not buf.any()
    assert int4_gemm(x, qweight, scales, zeros, g, config=cfg, gated=True).shape == (M, n)
    with pytest.raises(ValueError, match="gated needs an even N"):
        int4_gemm(x, qweight[:-1], scales[:-1], zeros[:-1] if asym else None, g, config=cfg, gated=True)
    with pytest.raises(ValueError, match=r"out must be \[M, N / 2\]"):
        int4_gemm(x, qweight, scales, zeros, g, config=cfg, out=torch.empty(M, 2 * n, dtype=x.dtype, device=device),
                  gated=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,n", [(1, 7), (7, 300), (9, 256)])
def test_silu_mul_matches_the_torch_ops(device, dtype, M, n):
    """silu_mul (the gated launches' second kernel) against F.silu then mul in the same dtype: rows and columns that
    are not multiples of its 4 x 256 tiles, y a column slice of a wider buffer, out a strided slice of a
    NaN-poisoned one whose other columns stay NaN."""
    wide_y = torch.randn(M, 2 * n + 5, dtype=dtype, device=device) * 4
    y = wide_y[:, 3:3 + 2 * n]
    buf = torch.full((M, n + 6), float("nan"), dtype=dtype, device=device)
    out = buf[:, 2:2 + n]
    assert silu_mul(y, out) is out
    assert_close(out, torch.mul(F.silu(y[:, :n]), y[:, n:]), dtype)
    assert buf[:, :2].isnan().all() and buf[:, 2 + n:].isnan().all()
    assert silu_mul(y[:0], out[:0]).shape == (0, n)  # nothing to launch


@pytest.mark.gpu
def test_silu_mul_gpu_bf16_llama_width():
    """bf16 (which the interpreter cannot check) at a 1B prompt's SwiGLU width, [300, 2 x 8192] -> [300, 8192]."""
    y = torch.randn(300, 2 * 8192, dtype=torch.bfloat16, device="cuda") * 4
    out = torch.full((300, 8192), float("nan"), dtype=torch.bfloat16, device="cuda")
    silu_mul(y, out)
    assert_close(out, torch.mul(F.silu(y[:, :8192]), y[:, 8192:]), torch.bfloat16)


# tiled3 (swap-AB tensor-core kernel): BLOCK_K 128 (its dots need K = BLOCK_K / 8 >= 16 on the GPU), so
# groups of 128 and 256 (a group spanning two K blocks); split-K 1 and 3 (a ragged last slice).
TILED3 = {"impl": "tiled3", "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 1}
TILED3_SPLIT = {**TILED3, "SPLIT_K": 3}


@pytest.mark.parametrize("cfg", [TILED3, TILED3_SPLIT], ids=["split1", "split3"])
@pytest.mark.parametrize("g,asym", [(128, True), (128, False), (256, True), (256, False)])
@pytest.mark.parametrize("M", [1, 3, 17])
def test_int4_gemm_tiled3(device, cfg, g, asym, M):
    """Odd M (1, 3, and 17 = two M tiles) and N, sym/asym, bias, NaN-poisoned out; with split-K a second
    call with new inputs on the same counters (the last slice must have re-armed them), counters at zero."""
    _check_calls_and_rearmed_counters(device, cfg, M, 37, 768, g, asym)


def test_int4_gemm_tiled3_extreme_codes_fractional_zeros_strided(device):
    """All-0 / all-15 codes at every nibble (the 0x6400 | q operand must be exactly 1024 + q), fractional
    zeros, and K-contiguous storage with a strided x (the kernel honours strides)."""
    M, N, K, g = 2, 24, 256, 128
    x = torch.randn(M, 2 * K, dtype=torch.float16, device=device)[:, ::2]
    _, scales, _ = _weights(N, K, g, False, device)
    zeros = (torch.rand(N, K // g, device=device) * 15).to(torch.float16)
    for word in (0x0F0F0F0F, -0x0F0F0F10, 0x76543210):
        qweight = torch.full((N, K // 8), word, dtype=torch.int32, device=device)
        out = _run(x, qweight, scales.contiguous(), zeros, g, TILED3_SPLIT)
        assert_close(out, _expected(x, qweight, scales, zeros, g), torch.float16)


# tcasm (swap-AB wgmma, nibble pairs by inline PTX on a GPU; the interpreter runs the plain-Triton twin of the
# unpack with the same values and the same permuted K order): a K block of one group with a ragged split-K, and
# K blocks of two groups (a dot per group) whose last one runs past K (384 = 3 groups of 128).
# num_warps 1 with BLOCK_N 32: two 16-row slabs per warp, so the dot rows are a non-trivial permutation of n
# (_tcasm_rows) as on the GPU.
TCASM = {"impl": "tcasm", "BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 3, "num_warps": 1}


@pytest.mark.parametrize("blocks", [1, 2], ids=["one_group", "two_groups"])
@pytest.mark.parametrize("g,asym", [(32, True), (64, False), (128, True), (128, False)])
@pytest.mark.parametrize("M", [1, 3, 17])
def test_int4_gemm_tcasm(device, blocks, g, asym, M):
    """Odd M (17 = two M tiles) and N, every group size, sym/asym, bias, NaN-poisoned out; with split-K a second
    call with new inputs on the same counters (the last slice must have re-armed them), counters at zero."""
    cfg = {**TCASM, "BLOCK_K": blocks * g, "SPLIT_K": 3 if blocks == 1 else 1}
    _check_calls_and_rearmed_counters(device, cfg, M, 37, 384, g, asym)


@pytest.mark.parametrize("direct", [1, 2])
@pytest.mark.parametrize("g,asym", [(32, True), (64, False), (128, False)])
@pytest.mark.parametrize("M", [1, 17])
def test_int4_gemm_tcasm_direct(device, direct, g, asym, M):
    """DIRECT (one group per iteration, words in the dot's row order, prefetched x / scales; the symmetric zero by
    a second dot or a centered unpack): ragged split-K over an odd number of groups, counters re-armed."""
    cfg = {**TCASM, "BLOCK_K": g, "SPLIT_K": 3, "DIRECT": direct}
    _check_calls_and_rearmed_counters(device, cfg, M, 37, 5 * g, g, asym)


def test_int4_gemm_tcasm_extreme_codes_fractional_zeros_strided(device):
    """All-0 / all-15 codes and a word of 8 distinct codes (every nibble must land at its own permuted k),
    fractional zeros, K-contiguous storage with a strided x."""
    M, N, K, g = 2, 24, 256, 64
    x = torch.randn(M, 2 * K, dtype=torch.float16, device=device)[:, ::2]
    _, scales, _ = _weights(N, K, g, False, device)
    zeros = (torch.rand(N, K // g, device=device) * 15).to(torch.float16)
    for word in (0x0F0F0F0F, -0x0F0F0F10, 0x76543210, -0x01234568):  # the last: 0xFEDCBA98
        qweight = torch.full((N, K // 8), word, dtype=torch.int32, device=device)
        out = _run(x, qweight, scales.contiguous(), zeros, g, {**TCASM, "BLOCK_K": 64})
        assert_close(out, _expected(x, qweight, scales, zeros, g), torch.float16)


def test_int4_gemm_tcasm_rejects_float32_x_and_short_blocks():
    qweight, scales, zeros = _weights(16, 128, 32, True, "cpu")
    with pytest.raises(ValueError, match="float32"):
        int4_gemm(torch.randn(1, 128), qweight, scales, zeros, 32, config={**TCASM, "BLOCK_K": 32})
    with pytest.raises(ValueError, match="32-column"):
        int4_gemm(torch.randn(1, 128, dtype=torch.float16), qweight, scales, zeros, 32,
                  config={**TCASM, "BLOCK_K": 16})


def test_int4_gemm_gemv2_extreme_codes_and_zeros(device):
    """All-0 and all-15 codes with fractional zeros: the biased unpack (B + q, B = 2^7 / 2^11) must give
    back q exactly at both ends, for every nibble position."""
    M, N, K, g = 2, 24, 128, 32
    x = torch.randn(M, K, dtype=torch.float16, device=device)
    _, scales, _ = _weights(N, K, g, False, device)
    zeros = (torch.rand(N, K // g, device=device) * 15).to(torch.float16)
    for word in (0x0F0F0F0F, -0x0F0F0F10):  # 0x0F0F0F0F and 0xF0F0F0F0: 0 and 15 at every nibble
        qweight = torch.full((N, K // 8), word, dtype=torch.int32, device=device)
        for cfg in ({**GEMV2, "BLOCK_M": 2}, TILED2):
            out = _run(x, qweight, scales, zeros, g, cfg)
            assert_close(out, _expected(x, qweight, scales, zeros, g), torch.float16)
        for row in range(M):  # the plane-at-a-time unpack and the word sums (one row per launch)
            for cfg in (GEMV2_PLANES, GEMV2_PAIRS, GEMV2_PAIRS_PX):
                out = _run(x[row:row + 1], qweight, scales, zeros, g, cfg)
                assert_close(out, _expected(x[row:row + 1], qweight, scales, zeros, g), torch.float16)


def test_int4_gemm_gemv2_planes_needs_one_row():
    x = torch.randn(2, 64, dtype=torch.float16)
    qweight, scales, zeros = _weights(16, 64, 32, True, "cpu")
    with pytest.raises(ValueError, match="needs BLOCK_M=1"):
        int4_gemm(x, qweight, scales, zeros, 32, config={**GEMV2_PLANES, "BLOCK_M": 2})
    with pytest.raises(ValueError, match="not both"):
        int4_gemm(x[:1], qweight, scales, zeros, 32, config={**GEMV2_PAIRS, "PLANES": 1})
    for cfg in ({**GEMV2, "PREFETCH_X": 1}, {**GEMV2_PAIRS_PX, "PREFETCH": 2}, {**GEMV2_PAIRS_PX, "PREFETCH": 0}):
        with pytest.raises(ValueError, match="PREFETCH_X=1 needs PAIRS=1 and PREFETCH=1"):
            int4_gemm(x[:1], qweight, scales, zeros, 32, config=cfg)


@pytest.mark.parametrize("cfg", [GEMV_SPLIT, TILED, TILED_SPLIT, GEMV2],
                         ids=["gemv_splitk", "tiled", "tiled_splitk", "gemv2"])
def test_int4_gemm_bias_and_strided_layouts(device, cfg):
    """Row-major (K-contiguous) storage instead of kernopt's N-contiguous one, and a strided x: the
    kernel honours strides instead of copying; a strided bias (int4_gemm hands the kernels a contiguous one)."""
    M, N, K, g = 5, 41, 192, 64
    x = torch.randn(M, 2 * K, dtype=torch.float16, device=device)[:, ::2]
    qweight, scales, zeros = _weights(N, K, g, True, device)
    qweight_t, scales_t, zeros_t = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    assert qweight_t.stride() != qweight.stride()
    bias = torch.randn(2 * N, dtype=torch.float16, device=device)[::2]
    out = _run(x, qweight_t, scales_t, zeros_t, g, cfg, bias=bias)
    assert_close(out, _expected(x, qweight, scales, zeros, g, bias), torch.float16)


def test_int4_gemm_int_zeros_and_fractional_zeros(device):
    """Zeros may be any dtype (GPTQ graphs produce int32 zeros) and need not be integers (float zeros)."""
    M, N, K, g = 2, 24, 128, 32
    x = torch.randn(M, K, dtype=torch.float16, device=device)
    qweight, scales, _ = _weights(N, K, g, False, device)
    int_zeros = torch.randint(0, 16, (N, K // g), dtype=torch.int32, device=device)
    frac_zeros = (torch.rand(N, K // g, device=device) * 15).to(torch.float16)
    for zeros in (int_zeros, frac_zeros):
        for cfg in (GEMV, TILED):
            out = _run(x, qweight, scales, zeros, g, cfg)
            assert_close(out, _expected(x, qweight, scales, zeros, g), torch.float16)


def test_int4_dequantize_kernel_matches_reference(device):
    N, K, g = 37, 256, 64
    qweight, scales, zeros = _weights(N, K, g, True, device)
    w = int4_dequantize(qweight, scales, zeros, g, torch.float16, {"BLOCK_N": 16, "BLOCK_K": 64})
    assert torch.equal(w, dequantize_int4(qweight, scales, zeros, g, torch.float16))


@pytest.mark.parametrize("asym", [True, False])
def test_int4_weight_op_is_the_reference_dequantization(asym):
    """kernopt.int4_weight (passes/int4.py's prompt weight): off CUDA the plain-torch dequantization, eagerly and
    inside a compiled graph."""
    N, K, g = 37, 192, 64
    qweight, scales, zeros = _weights(N, K, g, asym, "cpu")
    want = dequantize_int4(qweight, scales, zeros, g, torch.float32)
    assert torch.equal(torch.ops.kernopt.int4_weight(qweight, scales, zeros, g, torch.float32), want)
    x = torch.randn(5, K)
    torch._dynamo.reset()
    got = torch.compile(lambda x: x @ torch.ops.kernopt.int4_weight(qweight, scales, zeros, g, torch.float32).t())(x)
    assert_close(got, x.double() @ want.double().t(), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("asym", [True, False])
def test_int4_weight_op_on_gpu_eager_and_compiled(dtype, asym):
    """On CUDA kernopt.int4_weight runs int4_dequantize's kernel: eagerly and launched from Inductor's generated code
    (a triton_op), bit for bit the reference dequantization, on a weight whose N is not a multiple of the tile and
    after a NaN-filled block of the same size was freed (the allocator hands it back)."""
    N, K, g = 45, 384, 128
    qweight, scales, zeros = _weights(N, K, g, asym, "cuda", dtype)
    want = dequantize_int4(qweight, scales, zeros, g, dtype)
    want.new_full((N, K), float("nan"))  # freed at once: the block the op's output may reuse
    assert torch.equal(torch.ops.kernopt.int4_weight(qweight, scales, zeros, g, dtype), want)
    torch._dynamo.reset()
    f = torch.compile(lambda s: torch.ops.kernopt.int4_weight(qweight, s, zeros, g, dtype) * 1)
    want.new_full((N, K), float("nan"))
    assert torch.equal(f(scales), want)


def test_int4_gemm_ref_is_dequant_then_linear(device):
    M, N, K, g = 4, 16, 64, 32
    x = torch.randn(M, K, dtype=torch.float16, device=device)
    qweight, scales, zeros = _weights(N, K, g, True, device)
    assert_close(int4_gemm_ref(x, qweight, scales, zeros, g), _expected(x, qweight, scales, zeros, g), torch.float16)


@settings(max_examples=6, deadline=None)
@given(M=st.integers(1, 24), N=st.integers(1, 70), groups=st.integers(1, 3), g=st.sampled_from([32, 64, 128]),
       asym=st.booleans())
def test_int4_gemm_selected_config_hypothesis(M, N, groups, g, asym):
    """Whatever select_config picks for the shape (shrunk tiles keep the interpreter quick)."""
    K = groups * g
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(M, K, dtype=torch.float16, device=device)
    qweight, scales, zeros = _weights(N, K, g, asym, device)
    cfg = select_config(M, N, K, g)
    if device == "cpu" and cfg["impl"] == "tiled":
        cfg = {**cfg, "BLOCK_M": 16, "BLOCK_N": 32}
    out = _run(x, qweight, scales, zeros, g, cfg)
    assert_close(out, _expected(x, qweight, scales, zeros, g), torch.float16)


@pytest.mark.parametrize("variant", ["fp32", "planes", "tcasm"])
def test_gemv_variant_switch(device, monkeypatch, variant):
    """KERNOPT_INT4_GEMV (the llama suite's int4 GEMV experiment): only M=1 launches change (fp32: gemv2's fp32 path
    instead of PAIRS for bf16 x; planes / tcasm: symmetric weights only), and the table's call (config=None) computes
    the right product through it; an unknown value is an error."""
    from kernopt.kernels import int4_gemm as q4

    bf16 = torch.bfloat16
    default = select_config(1, 14336, 4096, 128, symmetric=True, x_dtype=bf16, ldmma=False)
    fp32_path = select_config(1, 14336, 4096, 128, symmetric=True, x_dtype=torch.float32)
    assert default.get("PAIRS") == 1 and not fp32_path.get("PAIRS")
    monkeypatch.setenv(q4.GEMV_VARIANT_ENV, variant)
    cfg = select_config(1, 14336, 4096, 128, symmetric=True, x_dtype=bf16)
    assert cfg != default and {"planes": cfg.get("PLANES") == 1, "fp32": cfg == fp32_path,
                               "tcasm": cfg["impl"] == "tcasm"}[variant]
    assert select_config(1, 14336, 4096, 128, x_dtype=bf16) == fp32_path  # zero points: the fp32 path
    assert select_config(4, 14336, 4096, 128, symmetric=True) == select_config(4, 14336, 4096, 128)  # not a GEMV
    N, K, g = 37, 256, 64
    x = torch.randn(1, K, dtype=torch.float16, device=device)
    qweight, scales, zeros = _weights(N, K, g, False, device)
    assert_close(_run(x, qweight, scales, zeros, g, None), _expected(x, qweight, scales, zeros, g), torch.float16)
    x32 = x.float()  # float32 x keeps the table's GEMV (tcasm refuses it)
    assert_close(_run(x32, qweight, scales, zeros, g, None), _expected(x32, qweight, scales, zeros, g), torch.bfloat16)
    monkeypatch.setenv(q4.GEMV_VARIANT_ENV, "fastest")
    with pytest.raises(ValueError, match="KERNOPT_INT4_GEMV"):
        select_config(1, 14336, 4096, 128, symmetric=True)


def test_gemv_default_pick_and_variants_pairs64_px(monkeypatch):
    """bf16 x at M=1: PAIRS with 32 / 64 columns (the sweep's per-shape bests at the llama decode launch shapes; 64
    columns split to one wave, 4 warps at gate/up); KERNOPT_INT4_GEMV=pairs64 gives the 4-warp 64-column pick of
    747aee5, =split8 the 2-warp split 8-16 pick before 936f0f6, =px that pick with PREFETCH_X;
    other dtypes and M > 1 keep the table; every pick is a candidate the sweep times (and the GPU tests check)."""
    from kernopt.kernels import int4_gemm as q4

    bf16 = torch.bfloat16
    shapes = ((4096, 6144), (4096, 28672), (4096, 4096), (14336, 4096))
    table = {kn: select_config(1, kn[1], kn[0], 128, True, bf16, ldmma=False) for kn in shapes}
    assert [(c["BLOCK_N"], c["SPLIT_K"], c["num_warps"]) for c in table.values()] == \
        [(64, 11, 2), (64, 2, 4), (32, 16, 2), (32, 16, 2)]
    monkeypatch.setenv(q4.GEMV_VARIANT_ENV, "pairs64")
    pairs64 = {kn: select_config(1, kn[1], kn[0], 128, True, bf16) for kn in shapes}
    assert [(c["BLOCK_N"], c["SPLIT_K"], c["num_warps"]) for c in pairs64.values()] == \
        [(64, 8, 4), (64, 8, 4), (64, 16, 4), (64, 16, 4)]
    monkeypatch.setenv(q4.GEMV_VARIANT_ENV, "split8")
    split8 = {kn: select_config(1, kn[1], kn[0], 128, True, bf16) for kn in shapes}
    assert [(c["BLOCK_N"], c["SPLIT_K"], c["num_warps"]) for c in split8.values()] == \
        [(64, 16, 2), (64, 8, 2), (32, 16, 2), (32, 16, 2)]
    monkeypatch.setenv(q4.GEMV_VARIANT_ENV, "px")
    px = {kn: select_config(1, kn[1], kn[0], 128, False, bf16) for kn in shapes}
    assert all(px[kn] == {**split8[kn], "PREFETCH_X": 1} for kn in shapes)
    for variant, picks in (("", table), ("pairs64", pairs64), ("px", px), ("split8", split8)):
        monkeypatch.setenv(q4.GEMV_VARIANT_ENV, variant)
        assert "PAIRS" not in select_config(1, 14336, 4096, 128, x_dtype=torch.float16)
        assert variant == "" or select_config(1, 14336, 4096, 128, True, bf16)["PAIRS"] == 1  # no ldmma
        assert select_config(4, 14336, 4096, 128) == select_config(4, 14336, 4096, 128, symmetric=True)
        for (k, n), cfg in picks.items():
            assert cfg["PAIRS"] == 1 and cfg in candidate_configs(1, n, k, 128), (variant, k, n, cfg)


def test_select_config_table():
    bf16 = torch.bfloat16
    for sym in (True, False):  # M=1 bf16 x: PAIRS, 32 columns split 16 / 64 columns split to one wave (H200 --tune)
        shapes = ((4096, 14336), (14336, 4096), (4096, 4096), (4096, 6144), (4096, 28672), (512, 1024))
        pairs = [select_config(1, n, k, 128, sym, bf16, ldmma=False) for k, n in shapes]
        assert [c["SPLIT_K"] for c in pairs] == [5, 16, 16, 11, 2, 2]
        assert [c["BLOCK_N"] for c in pairs] == [64, 32, 32, 64, 64, 32]
        assert select_config(1, 14336, 4096, 128, sym, bf16, ldmma=False)["PAIRS"] == 1
        # ldmma where it ran: K = 4096, 4096 <= N <= 16384, and K14336 N4096 (split 4 ways), M <= 8, bf16 x, group
        # 128 (else the table above)
        assert [select_config(1, n, k, 128, sym, bf16)["impl"] for k, n in shapes] == \
            ["ldmma", "ldmma", "ldmma", "gemv2", "gemv2", "gemv2"]  # (K4096 N6144 at one row: PAIRS was faster)
        assert [select_config(4, n, k, 128, sym, bf16)["impl"] for k, n in shapes[:4]] == ["ldmma"] * 4
    assert "PAIRS" not in select_config(1, 14336, 4096, 128, x_dtype=torch.float16)  # fp16 x: the fp32 path
    assert select_config(1, 14336, 4096, 128)["impl"] == "gemv2"
    assert select_config(1, 14336, 4096, 128)["SPLIT_K"] == 8  # the H200 sweep's best
    assert select_config(1, 4096, 4096, 128)["SPLIT_K"] == 16
    assert select_config(16, 14336, 4096, 128)["impl"] == "tiled2"
    # M=2 with bf16 x: two-row PAIRS (the H200 sweep's best) up to 4096 x 8192 weights, split down to >= 256 of K
    # per split, and where the wgr kernel may not run; above, wgr (8 rows)
    for sym in (True, False):
        for cfg in (select_config(2, 4096, 4096, 128, sym, bf16, ldmma=False),
                    select_config(2, 14336, 4096, 128, sym, bf16, False, ldmma=False)):
            assert (cfg["impl"], cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SPLIT_K"], cfg["PAIRS"]) == ("gemv2", 2, 32, 8, 1)
        assert select_config(2, 14336, 4096, 128, sym, bf16, ldmma=False)["impl"] == "wgr"
        assert select_config(2, 14336, 4096, 128, sym, bf16)["impl"] == "ldmma"
    assert [select_config(2, 4096, k, g, False, bf16)["SPLIT_K"] for k, g in ((1024, 128), (512, 32), (256, 64))] \
        == [4, 2, 1]
    assert select_config(2, 4096, 4096, 128, x_dtype=torch.float16)["impl"] == "tiled2"
    assert select_config(2, 14336, 4096, 128)["impl"] == "tiled2"
    assert select_config(3, 14336, 4096, 128, x_dtype=bf16, wgr=False, ldmma=False)["impl"] == "tiled2"
    # M = 2..16 with 16-bit x and groups >= 32: the wgr kernel (kernels/int4_wgmma.py), stream-K with 8 rows to M = 8,
    # 16 rows above; the split-K wgr at 16 rows on 4096^2 and smaller weights; nothing for groups of 16, float32 x
    for dt in (bf16, torch.float16):
        for M, N, K, want in ((3, 14336, 4096, (1, 8, 128)), (8, 4096, 14336, (1, 8, 128)), (4, 4096, 4096, (1, 8, 128)),
                              (9, 14336, 4096, (1, 16, 128)), (16, 4096, 14336, (1, 16, 128)),
                              (16, 4096, 4096, (None, 16, 64))):
            cfg = select_config(M, N, K, 128, False, dt, ldmma=False)
            assert cfg["impl"] == "wgr" and (cfg.get("STREAM"), cfg["BLOCK_M"], cfg["BLOCK_N"]) == want, (M, N, K)
    assert select_config(16, 4096, 4096, 128, False, bf16)["SPLIT_K"] == 8
    assert select_config(16, 14336, 4096, 16, False, bf16)["impl"] == "tiled2"
    assert select_config(16, 14336, 4096, 128, False, torch.float32)["impl"] == "tiled2"
    # M = 17..64: wgr with 32 / 64 rows, x permuted once per call (X_DOT) except 32 rows at 4096^2; past 64 tiled
    assert [(c["impl"], c["BLOCK_M"], c["BLOCK_N"], c.get("X_DOT", 0))
            for c in (select_config(m, n, 4096, 128, False, bf16) for n in (14336, 4096) for m in (17, 32, 33, 64))] \
        == [("wgr", 32, 128, 1), ("wgr", 32, 128, 1), ("wgr", 64, 64, 1), ("wgr", 64, 64, 1),
            ("wgr", 32, 64, 0), ("wgr", 32, 64, 0), ("wgr", 64, 64, 1), ("wgr", 64, 64, 1)]
    assert select_config(65, 14336, 4096, 128, False, bf16)["impl"] == "tiled"
    assert select_config(64, 14336, 4096, 128, False, bf16, wgr=False)["impl"] == "tiled"
    assert select_config(64, 14336, 4096, 128)["impl"] == "tiled"
    assert select_config(256, 14336, 4096, 128)["impl"] in ("tiled", "dequant_cublas")
    assert select_config(8192, 14336, 4096, 128)["impl"] == "dequant_cublas"
    for M in (1, 7, 16, 64, 300):
        for g in (32, 64, 128):
            cfg = select_config(M, 4096, 4096, g)
            assert g % cfg["BLOCK_K"] == 0


def test_int4_gemm_rejects_bad_inputs():
    x = torch.randn(2, 64, dtype=torch.float16)
    qweight, scales, zeros = _weights(8, 64, 32, True, "cpu")
    with pytest.raises(ValueError, match="group_size"):
        int4_gemm(x, qweight, scales, zeros, 48)
    with pytest.raises(ValueError, match="scales"):
        int4_gemm(x, qweight, scales[:, :1], zeros, 32)
    with pytest.raises(ValueError, match="qweight"):
        int4_gemm(x, qweight.to(torch.int64), scales, zeros, 32)
    with pytest.raises(ValueError, match="impl"):
        int4_gemm(x, qweight, scales, zeros, 32, config={"impl": "magic"})
    with pytest.raises(ValueError, match="BLOCK_K"):
        int4_gemm(x, qweight, scales, zeros, 32, config={**GEMV, "BLOCK_K": 64})
    with pytest.raises(ValueError, match="BLOCK_K"):  # K blocks of several groups: gemv2 at one row only
        int4_gemm(x, qweight, scales, zeros, 32, config={**GEMV2, "BLOCK_M": 2, "BLOCK_K": 64})
    with pytest.raises(ValueError, match="BLOCK_K"):
        int4_gemm(x, qweight, scales, zeros, 32, config={**GEMV2, "BLOCK_K": 48})
    with pytest.raises(ValueError, match="BLOCK_K"):
        int4_gemm(x, qweight, scales, zeros, 32, config={**TILED3, "BLOCK_K": 128})


def test_fill_split_keeps_the_grid_within_the_resident_programs():
    """_fill_split: the largest split, as the launcher rounds it to whole K blocks, whose grid fits `programs`; the
    M=1 candidates include one- and two-wave splits per PAIRS tile."""
    from kernopt.kernels.int4_gemm import _cdiv_split, _fill_split, _pairs_programs_per_sm

    for tiles, K, bk, programs in ((224, 4096, 128, 1320), (64, 14336, 128, 1320), (448, 4096, 128, 2772),
                                   (3000, 4096, 128, 1320), (7, 640, 128, 20), (1, 128, 128, 50)):
        split = _fill_split(tiles, K, bk, programs)
        assert split == _cdiv_split(K, split, bk)  # a split the launcher keeps as it is
        assert split == 1 or tiles * split <= programs
        bigger = [s for s in range(split + 1, K // bk + 1) if _cdiv_split(K, s, bk) > split]
        assert not bigger or tiles * _cdiv_split(K, bigger[0], bk) > programs
    assert _pairs_programs_per_sm(32, 2) == 21 and _pairs_programs_per_sm(64, 2) == 10
    cands = [(c["BLOCK_N"], c["num_warps"], c["SPLIT_K"]) for c in candidate_configs(1, 14336, 4096, 128)
             if c.get("PAIRS")]
    assert (64, 2, 5) in cands and (32, 2, 6) in cands
    for M, N, K in ((1, 1000, 1024), (1, 14336, 4096), (16, 4096, 14336)):
        every = candidate_configs(M, N, K, 128)
        assert len(every) == len({tuple(sorted(c.items())) for c in every})  # each config timed once


def test_candidate_configs_sweep_the_variants_for_small_m():
    for M in (1, 4, 16):
        impls = {c["impl"] for c in candidate_configs(M, 14336, 4096, 128)}
        assert {"tiled2", "tiled", "dequant_cublas"} <= impls
        assert "gemv2" in impls  # at M > 1: multi-row PAIRS (2 or 4 rows per program)
    for M in (1, 4, 16):
        tiled3 = [c for c in candidate_configs(M, 14336, 4096, 128) if c["impl"] == "tiled3"]
        assert tiled3 and all(c["BLOCK_K"] >= 128 and c["BLOCK_M"] == 16 for c in tiled3)
    assert not [c for c in candidate_configs(4, 4096, 4096, 64) if c["impl"] == "tiled3"]
    assert not {"gemv2", "tiled2", "tiled3"} & {c["impl"] for c in candidate_configs(64, 14336, 4096, 128)}
    for M in (1, 3, 16):
        for c in candidate_configs(M, 4096, 4096, 32):
            if c["impl"] == "tgemv":  # steps of whole groups, no BLOCK_K (tests/kernels/test_int4_tgemv.py)
                assert "BLOCK_K" not in c and c["ROWS"] * 8 >= 32
                continue
            # K blocks divide a group, or (gemv2 at one row, tcasm) span whole groups
            multi = (c["impl"] == "tcasm" or (c["impl"] == "gemv2" and c["BLOCK_M"] == 1)) and c["BLOCK_K"] % 32 == 0
            assert 32 % c["BLOCK_K"] == 0 or multi, c
    assert any(c["BLOCK_K"] > 128 for c in candidate_configs(1, 14336, 4096, 128) if c["impl"] == "gemv2")
    for M in (1, 4, 16):  # tcasm: swept at M <= 16 for every group size, never the table's pick (slower on the H200)
        for g in (32, 64, 128):
            tcasm = [c for c in candidate_configs(M, 14336, 4096, g) if c["impl"] == "tcasm"]
            assert tcasm and all(c["BLOCK_K"] in (g, 2 * g) and c["BLOCK_M"] == 16 for c in tcasm)
            assert {c.get("DIRECT", 0) for c in tcasm} == {0, 1, 2}
            assert select_config(M, 14336, 4096, g)["impl"] != "tcasm"
    assert not [c for c in candidate_configs(64, 14336, 4096, 128) if c["impl"] == "tcasm"]


@pytest.mark.gpu
def test_int4_gemm_gpu_single_pass_candidates():
    """Every gemv2 / tiled2 / tiled3 / tcasm / wgr config the --tune sweep tries at M <= 16 (bf16, the benchmark's dtype), on a
    real GPU, twice in a row (the single-pass counters must be re-armed), and under CUDA graph replay."""
    dtype = torch.bfloat16
    N, K, g = 1000, 1024, 128
    qweight, scales, zeros = _weights(N, K, g, True, "cuda", dtype)
    for M in (1, 4, 16):
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        expected = _expected(x, qweight, scales, zeros, g)
        for cfg in [c for c in candidate_configs(M, N, K, g) if c["impl"] in ("gemv2", "tiled2", "tiled3", "tcasm", "wgr")]:
            for _ in range(2):
                out = _run(x, qweight, scales, zeros, g, cfg)
                assert_close(out, expected, dtype, scale=2.0)
            out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
            int4_gemm(x, qweight, scales, zeros, g, config=cfg, out=out)  # warm-up / compile
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                int4_gemm(x, qweight, scales, zeros, g, config=cfg, out=out)
            for _ in range(3):
                out.fill_(float("nan"))
                graph.replay()
                assert_close(out, expected, dtype, scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("M", [1, 4, 16, 64, 256, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_gemm_gpu_selected_configs(M, dtype, asym):
    """The table's pick with and without zero points (config=None, as the ops call it)."""
    N, K, g = 1000, 1024, 128
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    qweight, scales, zeros = _weights(N, K, g, asym, "cuda", dtype)
    bias = torch.randn(N, dtype=dtype, device="cuda")
    out = _run(x, qweight, scales, zeros, g, None, bias=bias)
    assert_close(out, _expected(x, qweight, scales, zeros, g, bias), dtype, scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("asym", [True, False])
def test_int4_gemm_gpu_selected_gemv_float32_x(asym):
    """The table's M=1 pick with float32 x and bf16 weights: what the int4 pass hands the GEMV (it casts the
    output back to bf16, so bf16's tolerance; the H200 gave ~2e-4 absolute error on outputs of magnitude ~1, more
    than float32's 1e-5: the kernel's biased-nibble sums are not float32-exact)."""
    N, K, g = 1000, 1024, 128
    x = torch.randn(1, K, dtype=torch.float32, device="cuda")
    qweight, scales, zeros = _weights(N, K, g, asym, "cuda", torch.bfloat16)
    out = _run(x, qweight, scales, zeros, g, None)
    assert_close(out, _expected(x, qweight, scales, zeros, g), torch.bfloat16)


def _check_each_twice(cands, x, qweight, scales, zeros, g, bias, expected):
    """Every config of `cands` (at least one) right twice in a row (the second call reads re-armed split-K
    counters)."""
    assert cands
    for cfg in cands:
        for _ in range(2):
            out = _run(x, qweight, scales, zeros, g, cfg, bias=bias)
            assert_close(out, expected, x.dtype, scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("K,N", [(4096, 14336), (14336, 4096), (4096, 4096)])
def test_int4_gemm_gpu_tiled3_suite_shapes(M, K, N):
    """tiled3's candidates at the benchmark's shapes (bf16, group 128, bias), each called twice."""
    dtype, g = torch.bfloat16, 128
    qweight, scales, zeros = _weights(N, K, g, True, "cuda", dtype)
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    bias = torch.randn(N, dtype=dtype, device="cuda")
    expected = _expected(x, qweight, scales, zeros, g, bias)
    cands = [c for c in candidate_configs(M, N, K, g) if c["impl"] == "tiled3"]
    _check_each_twice(cands, x, qweight, scales, zeros, g, bias, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g,asym", [(32, True), (64, False), (128, True), (128, False)])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_int4_gemm_gpu_tcasm(M, g, asym, dtype):
    """tcasm's inline-PTX unpack (the interpreter never runs it) against int4_gemm_ref in float64: bf16 and fp16 x
    (0x4300 / 0x6400 halves), odd N, an odd number of groups (K = 5 g, so two-group blocks run past K), every
    candidate tile of the --tune sweep for this group size, bias, NaN-poisoned out, called twice (re-armed
    split-K counters)."""
    N, K = 999, 5 * g
    qweight, scales, zeros = _weights(N, K, g, asym, "cuda", dtype)
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    bias = torch.randn(N, dtype=dtype, device="cuda")
    expected = int4_gemm_ref(x.double(), qweight, scales, zeros, g, bias.double())
    cands = [c for c in candidate_configs(M, 14336, 4096, g) if c["impl"] == "tcasm"]
    _check_each_twice(cands, x, qweight, scales, zeros, g, bias, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("g,asym", [(32, True), (64, False), (128, True), (128, False)])
def test_int4_gemm_gpu_pairs(g, asym):
    """gemv2 PAIRS' inline PTX (the interpreter runs its plain twin): bf16 x, odd N, an odd number of groups (K = 5 g:
    multi-group blocks run past K), every PAIRS candidate, bias, NaN-poisoned out, twice (re-armed counters); words
    of distinct / extreme codes with fractional zeros (each nibble must meet its own x); |x| ~ 1e4 (bf16 sums do
    not overflow); a misaligned, strided x (copied by the launcher); fp16 x refused."""
    dtype, M, N, K = torch.bfloat16, 1, 999, 5 * g
    qweight, scales, zeros = _weights(N, K, g, asym, "cuda", dtype)
    bias = torch.randn(N, dtype=dtype, device="cuda")
    cands = [c for c in candidate_configs(1, 14336, 4096, g) if c.get("PAIRS")]
    assert cands
    for amp in (1.0, 1e4):  # bf16 sums of 4 products: an error that scales with the outputs' RMS (atol by it)
        x = torch.randn(M, K, dtype=dtype, device="cuda") * amp
        expected = int4_gemm_ref(x.double(), qweight, scales, zeros, g, bias.double())
        for cfg in cands:
            for _ in range(2):
                out = _run(x, qweight, scales, zeros, g, cfg, bias=bias)
                problem = mismatch(out, expected, dtype, scale=2.0, magnitude=rms(expected))
                assert problem is None, f"{cfg}: {problem}"
    xs = torch.randn(1, 2 * K + 1, dtype=dtype, device="cuda")[:, 1::2]  # stride 2, odd element offset
    assert_close(_run(xs, qweight, scales, zeros, g, cands[0]), int4_gemm_ref(xs.double(), qweight, scales, zeros, g),
                 dtype, scale=2.0)
    _, s, _ = _weights(40, 256, g, False, "cuda", dtype)
    z = (torch.rand(40, 256 // g, device="cuda") * 15).to(dtype) if asym else None
    x = torch.randn(1, 256, dtype=dtype, device="cuda")
    for word in (0x0F0F0F0F, -0x0F0F0F10, 0x76543210, -0x01234568):
        qw = torch.full((40, 32), word, dtype=torch.int32, device="cuda")
        for cfg in cands[:3]:
            assert_close(_run(x, qw, s, z, g, cfg), int4_gemm_ref(x.double(), qw, s, z, g), dtype, scale=2.0)
    with pytest.raises(ValueError, match="PAIRS=1 takes bfloat16"):
        _run(x.half(), qw, s.half(), z.half() if asym else None, g, cands[0])


@pytest.mark.gpu
@pytest.mark.parametrize("g,asym", [(32, True), (128, False), (128, True)])
def test_int4_gemm_gpu_gated_swiglu(g, asym):
    """gated=True on the GPU: bf16 x through every PAIRS candidate's epilogue (inline PTX), odd N/2, K = 5 g, bias,
    NaN-poisoned out, twice; and the table's pick at the llama 8B gate/up shape (K4096, 2 x 14336)."""
    dtype, n, K = torch.bfloat16, 999, 5 * g
    qweight, scales, zeros = _weights(2 * n, K, g, asym, "cuda", dtype)
    bias = torch.randn(2 * n, dtype=dtype, device="cuda")
    x = torch.randn(1, K, dtype=dtype, device="cuda")
    expected = _swiglu_expected(x, qweight, scales, zeros, g, bias)
    for cfg in [c for c in candidate_configs(1, 14336, 4096, g) if c.get("PAIRS")]:
        for _ in range(2):
            out = torch.full((1, n), float("nan"), dtype=dtype, device="cuda")
            int4_gemm(x, qweight, scales, zeros, g, bias=bias, config=cfg, out=out, gated=True)
            problem = mismatch(out, expected, dtype, scale=2.0, magnitude=rms(expected))
            assert problem is None, f"{cfg}: {problem}"
    qweight, scales, zeros = _weights(2 * 14336, 4096, 128, asym, "cuda", dtype)
    x = torch.randn(1, 4096, dtype=dtype, device="cuda")
    expected = _swiglu_expected(x, qweight, scales, zeros, 128, None)
    out = int4_gemm(x, qweight, scales, zeros, 128, gated=True)
    assert mismatch(out, expected, dtype, scale=2.0, magnitude=rms(expected)) is None


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16])
def test_int4_gemm_gpu_tcasm_suite_shape_and_codes(M):
    """K4096 N14336 g128 (the benchmark's shape) for tcasm's tiles, and words of extreme / distinct codes with
    fractional zeros through the inline-PTX unpack (each nibble must land at its own permuted k)."""
    dtype, N, K, g = torch.bfloat16, 14336, 4096, 128
    qweight, scales, zeros = _weights(N, K, g, True, "cuda", dtype)
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    expected = int4_gemm_ref(x.double(), qweight, scales, zeros, g)
    cands = [c for c in candidate_configs(M, N, K, g) if c["impl"] == "tcasm"]
    for cfg in cands:
        assert_close(_run(x, qweight, scales, zeros, g, cfg), expected, dtype, scale=2.0)
    N, K = 40, 256
    zeros = (torch.rand(N, K // g, device="cuda") * 15).to(dtype)
    scales = scales[:N, :K // g].contiguous()
    x = x[:, :K].contiguous()
    for word in (0x0F0F0F0F, -0x0F0F0F10, 0x76543210, -0x01234568):
        qweight = torch.full((N, K // 8), word, dtype=torch.int32, device="cuda")
        for cfg in cands[:3]:
            out = _run(x, qweight, scales, zeros, g, cfg)
            assert_close(out, int4_gemm_ref(x.double(), qweight, scales, zeros, g), dtype, scale=2.0)


# Multi-row PAIRS (BLOCK_M 2 / 4): each word unpacked once for every x row. Rows past M (M = 3 in a 4-row block,
# M = 5 in three 2-row blocks), several row blocks, odd N, ragged split-K, K blocks of several groups past K; the
# interpreter runs the plain-Triton twin.
GEMV2_PAIRS_ROWS = {**GEMV2_PAIRS, "BLOCK_M": 4}
GEMV2_PAIRS_ROWS_MULTI = {**GEMV2_PAIRS_MULTI, "BLOCK_M": 2}
GEMV2_PAIRS_ROWS_MULTI_SPLIT = {**GEMV2_PAIRS_MULTI_SPLIT, "BLOCK_M": 4}


@pytest.mark.parametrize("cfg,M,g", [(GEMV2_PAIRS_ROWS, 3, 32), (GEMV2_PAIRS_ROWS, 4, 128),
                                     (GEMV2_PAIRS_ROWS_MULTI, 5, 32), (GEMV2_PAIRS_ROWS_MULTI, 2, 128),
                                     (GEMV2_PAIRS_ROWS_MULTI_SPLIT, 7, 32), ({**GEMV2_PAIRS_ROWS, "BLOCK_M": 2}, 1, 64)],
                         ids=["rows4-m3", "rows4-m4", "rows2-multi-tail-m5", "rows2-multi-tail-m2",
                              "rows4-multi-split-m7", "rows2-m1"])
@pytest.mark.parametrize("asym", [True, False])
def test_int4_gemm_pairs_rows(device, cfg, M, g, asym):
    """Multi-row PAIRS against the float64 reference: bias, NaN-poisoned out, a second call on re-armed counters."""
    _check_calls_and_rearmed_counters(device, cfg, M, 37, 384, g, asym)


def test_int4_gemm_pairs_rows_refusals():
    x = torch.randn(3, 64, dtype=torch.float16)
    qweight, scales, zeros = _weights(16, 64, 32, True, "cpu")
    for bm in (3, 8):
        with pytest.raises(ValueError, match="PAIRS=1 takes BLOCK_M in"):
            int4_gemm(x, qweight, scales, zeros, 32, config={**GEMV2_PAIRS, "BLOCK_M": bm})
    with pytest.raises(ValueError, match="no gated epilogue or PREFETCH_X"):
        int4_gemm(x, qweight, scales, zeros, 32, config={**GEMV2_PAIRS_PX, "BLOCK_M": 4})


def test_int4_gemm_pairs_rows_candidates():
    """M 2-16: multi-row PAIRS candidates (2 rows per program at M = 2, else 4), each with at most 64 accumulator
    floats per thread; none past 16; no gemv2 fp32-path rows (176-618 us at M = 4 on the H200)."""
    for m in (2, 3, 4, 8, 12, 16):
        rows = [c for c in candidate_configs(m, 14336, 4096, 128) if c["impl"] == "gemv2"]
        assert rows and all(c.get("PAIRS") == 1 for c in rows), m
        assert {c["BLOCK_M"] for c in rows} == {2 if m == 2 else 4}, m
        assert all(c["BLOCK_M"] * 16 * c["BLOCK_N"] <= 64 * 32 * c["num_warps"] for c in rows)
    assert all(c["BLOCK_M"] == 1 for c in candidate_configs(1, 14336, 4096, 128) if c.get("PAIRS"))
    assert not [c for c in candidate_configs(17, 14336, 4096, 128) if c.get("PAIRS")]


@pytest.mark.gpu
@pytest.mark.parametrize("g,asym", [(32, True), (128, False), (128, True)])
def test_int4_gemm_gpu_pairs_rows(g, asym):
    """Multi-row PAIRS' inline PTX (unpack once, then per row): bf16 x, M 2-7 and 16 (rows past M, several row blocks),
    odd N, K = 5 g, every multi-row candidate, bias, NaN-poisoned out, twice; each row against the float64
    reference and against the one-row PAIRS kernel on that row alone (the same word sums per row)."""
    dtype, N, K = torch.bfloat16, 999, 5 * g
    qweight, scales, zeros = _weights(N, K, g, asym, "cuda", dtype)
    bias = torch.randn(N, dtype=dtype, device="cuda")
    one_row = [c for c in candidate_configs(1, 14336, 4096, g) if c.get("PAIRS")][0]
    for M in (2, 3, 4, 7, 16):
        cands = [c for c in candidate_configs(M, 14336, 4096, g) if c.get("PAIRS")]
        assert cands and all(c["BLOCK_M"] > 1 for c in cands)
        x = torch.randn(M, K, dtype=dtype, device="cuda") * 100
        expected = int4_gemm_ref(x.double(), qweight, scales, zeros, g, bias.double())
        single = torch.cat([_run(x[i:i + 1], qweight, scales, zeros, g, one_row, bias=bias) for i in range(M)])
        for cfg in cands:
            for _ in range(2):
                out = _run(x, qweight, scales, zeros, g, cfg, bias=bias)
                problem = mismatch(out, expected, dtype, scale=2.0, magnitude=rms(expected))
                assert problem is None, f"M={M} {cfg}: {problem}"
                assert mismatch(out, single, dtype, scale=2.0, magnitude=rms(expected)) is None, f"M={M} {cfg}"
    for buf in workspace._BUFFERS.values():
        assert not buf.any()
