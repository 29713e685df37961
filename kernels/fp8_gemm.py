"""FP8 GEMM: e4m3 x e4m3 -> fp32 accumulate -> bf16/fp16/fp32, scales and bias in the epilogue.

Two entry points share one kernel:

- ``fp8_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype)``: the ``torch._scaled_mm`` contract. ``a`` [M, K]
  e4m3 (row-major), ``b`` [K, N] e4m3 (usually column-major, i.e. the transpose of a row-major [N, K]
  weight; any strides work, K-contiguous operands get the TMA kernel), ``scale_a`` a scalar or [M, 1],
  ``scale_b`` a scalar or [1, N], fp32. ``out = (a @ b) * scale_a * scale_b + bias`` in ``out_dtype``.
- ``fp8_linear(x, w_fp8, w_scale, bias)``: ``x`` [M, K] in bf16/fp16/fp32 is quantized per token by
  ``quantize_rows_fp8`` (row amax -> scale = amax * fp32(1/448) -> e4m3, saturating at +-448), then multiplied with
  the e4m3 weight ``w_fp8`` [N, K] whose per-output-channel scale ``w_scale`` is [N] or [N, 1] fp32.

Algorithm: each program owns a BLOCK_M x BLOCK_N tile of the output and walks K in BLOCK_K steps,
``acc += tl.dot(a_tile, b_tile)`` on float8e4nv operands (wgmma ...e4m3.e4m3 on Hopper: both operands must be
K-major in shared memory, which a row-major A and a [N, K] weight are). The epilogue multiplies the fp32
accumulator by ``scale_a[m] * scale_b[n]``, adds the bias, casts and stores. Large M uses a persistent
kernel with TMA tensor descriptors (one program per SM walking tiles in grouped order, so the B columns
a group shares stay in L2); small M (decode) swaps A and B, so the weight rows fill the 64-row wgmma M side
and the few tokens take the narrow N side, and uses the pointer kernel.

One-row decode (M <= GEMV_MAX_M) runs kernels/gemm.py's gemv instead (``config={"impl": "gemv", ...}``): a
batch-1 linear is a stream of its weight bytes, and the swap-AB tile pads the one token to 16 tensor-core rows
with one program per 64 weight rows over all of K (64 programs for N = 4096 on 132 SMs). The gemv loads 16-byte
vectors of e4m3 codes (16 per vector), multiplies in fp32 (codes are exact there), splits K when the grid is
short of programs (single-pass, kernels/workspace.py) and scales the sums by x_scale[m] then w_scale[n] in its
epilogue, as the tensor-core kernels do. KERNOPT_FP8_GEMV=0 keeps swap-AB (the llama suite's kernopt_fp8_nogemv).
H200 (92efe77, CUDA-graph replay, sweeps/fp8_gemv/gemm_fp8-h200.json), us at M = 1 with GEMV_TILE: K4096 N4096 8.29
(swap-AB at M = 16: 8.94; bf16 cuBLAS 15.13, cuBLAS _scaled_mm row-wise 14.58), K4096 N1024 6.33 (8.23 / 13.32),
K4096 N14336 21.26 (36.05 / 26.34), K14336 N4096 21.30 (37.74 / 45.54): 2.0-2.8 TB/s, under the bf16 gemv's 3.4-4.2.
Llama 8B bs1 decode (sweeps/fp8_gemv/llama-h200.json): 242.74 tok/s, step 4.05 ms, against 211.60 / 4.67 on swap-AB.
The tile is picked per weight shape since (`gemv_tile`, from `bench_gemm_fp8.py --decode`'s sweep of
GEMV_CANDIDATES and the split-K swap-AB candidates); at K > 4096 it runs the 3-stage loop (GEMV_TILE).

All-zero rows: the activation scale is floored (amax >= 1e-12), so a zero row gets a tiny positive scale
and quantizes to zeros: defined, never NaN.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .gemm import _fill_split_k, _single_pass
from .host import cdiv, env_switch, next_power_of_2, sm_count
from .tile_order import tile_coords

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# scale = amax * fp32(1 / 448), not amax / 448: torch on CUDA divides by a Python scalar exactly this way
# (a multiply by the fp32 reciprocal) while on CPU it divides, so the multiply is the one form that the
# kernel, the reference on either device and an eager model written `amax / 448` on CUDA all agree on.
INV_FP8_MAX = float(torch.tensor(1.0 / 448.0, dtype=torch.float32))
AMAX_FLOOR = 1e-12  # an all-zero row gets scale AMAX_FLOOR / 448 instead of 0 (x / 0 would be NaN)


# --------------------------------------------------------------------------------------------------
# Per-token activation quantization.
# --------------------------------------------------------------------------------------------------
@triton.jit
def _round_to_e4m3(v):
    """Round fp32 v (|v| <= 448) to the nearest e4m3 value, ties to even, staying in fp32.

    The cast that follows is then exact. The hardware cast rounds the same way by itself, but Triton's
    interpreter truncates with a broken carry (124.7 -> 64), and tests run there: one rounding for both.
    """
    bits = v.to(tl.uint32, bitcast=True)
    # normal range: keep 3 of fp32's 23 mantissa bits, round half to even; a carry rolls into the exponent
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    # e4m3 subnormals (|v| < 2^-6) are multiples of 2^-9: adding 1.5 * 2^14 rounds to that grid in fp32
    # (the magnitude is rounded and the sign put back, so -tiny stays -0 as in torch's cast)
    sub = ((tl.abs(v) + 24576.0) - 24576.0).to(tl.uint32, bitcast=True) | (bits & 0x80000000)
    return tl.where(tl.abs(v) < 0.015625, sub.to(tl.float32, bitcast=True), normal)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_xk, stride_qm,
                          BLOCK_K: tl.constexpr, ONE_BLOCK: tl.constexpr, INV_FP8_MAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if ONE_BLOCK:
        # the whole row fits in one block: load it once, reduce, quantize from registers
        mask = offs < K
        x = tl.load(x_row + offs * stride_xk, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.maximum(amax, 1e-12) * INV_FP8_MAX
        q = _round_to_e4m3(tl.minimum(tl.maximum(tl.div_rn(x, scale), -448.0), 448.0))
        tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            mask = k + offs < K
            x = tl.load(x_row + (k + offs) * stride_xk, mask=mask, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(x))
        amax = tl.max(acc, axis=0)
        scale = tl.maximum(amax, 1e-12) * INV_FP8_MAX
        for k in range(0, K, BLOCK_K):
            mask = k + offs < K
            x = tl.load(x_row + (k + offs) * stride_xk, mask=mask, other=0.0).to(tl.float32)
            # clamp before the cast: rounding can push |x / scale| a hair past 448, and e4m3fn has no inf
            q = _round_to_e4m3(tl.minimum(tl.maximum(tl.div_rn(x, scale), -448.0), 448.0))
            tl.store(q_row + k + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def quantize_rows_fp8(x: torch.Tensor, block_k: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fp8 [M, K] e4m3, x_scale [M, 1] fp32) with x ~= x_fp8 * x_scale, one scale per row."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows_fp8: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"quantize_rows_fp8: x must be bf16/fp16/fp32, got {x.dtype}")
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=FP8_DTYPE)
    s = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    if M == 0:
        return q, s
    if K == 0:
        return q, s.fill_(AMAX_FLOOR * INV_FP8_MAX)
    block = block_k or min(next_power_of_2(K), 4096)
    num_warps = 4 if block <= 2048 else 8
    _quantize_rows_kernel[(M,)](x, q, s, K, x.stride(0), x.stride(1), q.stride(0),
                                BLOCK_K=block, ONE_BLOCK=block >= K, INV_FP8_MAX=INV_FP8_MAX,
                                num_warps=num_warps)
    return q, s


def quantize_rows_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's math in plain torch, bit for bit (on CPU and CUDA)."""
    amax = x.float().abs().amax(dim=-1, keepdim=True) if x.shape[-1] else x.new_zeros((*x.shape[:-1], 1)).float()
    # literals, not the module's names: under torch.compile(dynamic=True) Dynamo lifts float globals to graph
    # inputs, and the fp8 pass could no longer see that this is the per-token quantization (asserted below)
    scale = amax.clamp(min=1e-12) * 0.0022321429569274187
    q = (x.float() / scale).clamp(-448.0, 448.0).to(FP8_DTYPE)
    return q, scale


assert (AMAX_FLOOR, INV_FP8_MAX, FP8_MAX) == (1e-12, 0.0022321429569274187, 448.0)


def quantize_weight_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel weight quantization: (w_fp8 [N, K] e4m3, w_scale [N] fp32). Plain torch: runs once."""
    q, s = quantize_rows_fp8_ref(w)
    return q, s.reshape(-1)


# --------------------------------------------------------------------------------------------------
# The GEMM.
# --------------------------------------------------------------------------------------------------
@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sb_ptr, bias_ptr, stride_sa, stride_sb,
              HAS_BIAS: tl.constexpr):
    sa = tl.load(sa_ptr + offs_m * stride_sa, mask=offs_m < M, other=0.0)
    sb = tl.load(sb_ptr + offs_n * stride_sb, mask=offs_n < N, other=0.0)
    acc = acc * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    return acc


@triton.jit
def _bias_along_m(acc, offs_m, M, bias_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)
        acc = acc + bias[:, None]
    return acc


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_sa, stride_sb,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_ALONG_M: tl.constexpr,
                     EVEN_K: tl.constexpr):
    """C[M, N] = A[M, K] @ B[K, N] * sa[m] * sb[n] (+ bias), any strides; one program per output tile."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows/columns past the edge wrap around instead of being masked: their results are never stored
    am = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + am[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + bn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if BIAS_ALONG_M:  # swapped A/B (decode): the bias belongs to the rows of this product
        acc = _epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sb_ptr, bias_ptr, stride_sa, stride_sb, False)
        acc = _bias_along_m(acc, offs_m, M, bias_ptr, HAS_BIAS)
    else:
        acc = _epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sb_ptr, bias_ptr, stride_sa, stride_sb, HAS_BIAS)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _fp8_gemm_tma_kernel(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, bias_ptr, M, N, K, stride_sa, stride_sb,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         FLATTEN: tl.constexpr):
    """Persistent TMA version: A [M, K] and B as a [N, K] (K-major) tensor, C [M, N]; K % 16 == 0."""
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])
            b = b_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        acc = _epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sb_ptr, bias_ptr, stride_sa, stride_sb, HAS_BIAS)
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


# --------------------------------------------------------------------------------------------------
# Configs: the one shape -> config table of this family.
# --------------------------------------------------------------------------------------------------
GEMV_ENV = "KERNOPT_FP8_GEMV"
GEMV_MAX_M = 1
# The gemv's tiles for e4m3 rows: (BLOCK_N weight rows, BLOCK_K codes = bytes of a row per K block, warps).
# Its loop is not pipelined (kernels/gemm.py): what a program has in flight is one K block, 32 KB in every tile
# below. H200 sweep (sweeps/fp8_gemv_tiles, f4d2c0c, CUDA-graph replay, us at M = 1; the old default in brackets):
# K4096 N4096 8 x 4096 7.80 (16 x 2048 8.18); K4096 N1024 8 x 4096 4.93 (6.45: 64 programs); K4096 N14336
# 32 x 512 19.57 (20.97; 8 x 4096 21.75); K14336 N4096 16 x 2048 20.97 (no tile faster; 8 x 4096, with a half
# block at the end, 29.36). Split-K swap-AB on the tensor cores (SPLIT_SWAPAB_CANDIDATES, sweeps/fp8_swapab) was
# slower at all four: 10.17 / 5.99 / 22.16 / 22.58.
# K above GEMV_WHOLE_K: 1024-code blocks through the 3-stage cp.async loop (LOAD_STAGES), two blocks in flight during
# one block's math. H200 sweeps/fp8_stages (19ca7d0): 5.9 TFLOP/s at K14336 N4096 against 5.52 for 16 x 2048 with
# one block in flight (19.9 against 21.3 us); confirmed twice at c80c4e5: sweeps/fp8_stages2, fp8_stages3.
GEMV_TILE = (16, 1024, 4, 3)
GEMV_WHOLE_K = 4096  # up to this K: one K block per row (BLOCK_K = K rounded up to a power of two)
GEMV_WIDE = (32, 512, 4, 1)  # N >= GEMV_WIDE_N and K <= GEMV_WHOLE_K (3 stages: 5.7 against 5.97 TFLOP/s)
GEMV_WIDE_N = 8192
GEMV_BLOCK_BYTES = 32 * 1024
GEMV_CANDIDATES = ((16, 1024, 4), (16, 2048, 4), (32, 1024, 4), (32, 512, 4), (64, 512, 4), (8, 4096, 4),
                   (64, 1024, 8))


# Split-K swap-AB (kernels/gemm.py's swapab kernel on e4m3 codes, the SCALED epilogue): the tensor cores do the
# math, so the weight stream costs no conversions, and K slices fill the SMs that swap-AB's 64-row tiles leave idle
# (64 tiles at N = 4096). (BLOCK_N weight rows, BLOCK_K codes, num_stages, programs per SM the split aims for).
SPLIT_SWAPAB_CANDIDATES = ((64, 256, 4, 2), (64, 256, 4, 4), (64, 128, 6, 4), (64, 128, 4, 8), (128, 128, 4, 2),
                           (128, 256, 3, 2))


def _split_swapab_cfg(M: int, N: int, K: int, bn: int, bk: int, stages: int, per_sm: int) -> dict:
    bm = max(16, next_power_of_2(M))
    return {"impl": "swapab", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
            "SPLIT_K": _fill_split_k(M, N, K, bm, bn, bk, per_sm, min_blocks=2), "num_warps": 4,
            "num_stages": stages}


def gemv_enabled() -> bool:
    return env_switch(GEMV_ENV, "1")


def gemv_tile(N: int, K: int) -> tuple[int, int, int, int]:
    """The gemv's (BLOCK_N, BLOCK_K, warps, stages) for an [N, K] e4m3 weight (the sweeps above GEMV_TILE)."""
    if K > GEMV_WHOLE_K:
        return GEMV_TILE
    if N >= GEMV_WIDE_N:
        return GEMV_WIDE
    bk = max(16, next_power_of_2(K))
    return min(GEMV_BLOCK_BYTES // bk, max(8, next_power_of_2(N))), bk, 4, 1


def _gemv_cfg(M: int, N: int, K: int, bn: int, bk: int, warps: int, per_sm: int = 1, stages: int = 1) -> dict:
    bm = max(1, next_power_of_2(M))
    return {"impl": "gemv", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
            "SPLIT_K": _fill_split_k(M, N, K, bm, bn, bk, per_sm, min_blocks=2), "num_warps": warps,
            "num_stages": stages}


def select_config(M: int, N: int, K: int) -> dict:
    """Tile config by shape. One row (M <= GEMV_MAX_M): the gemv (module docstring). Decode (M <= 64) is
    memory-bound on the weight: swap A/B so the weight rows fill the wgmma M side, small tiles over N for many
    programs. Prefill is compute-bound: big tensor-core tiles through the persistent TMA kernel."""
    if M <= GEMV_MAX_M and gemv_enabled():
        bn, bk, warps, stages = gemv_tile(N, K)
        return _gemv_cfg(M, N, K, bn, bk, warps, stages=stages)
    # Measured on an H100 (CUDA-graph replay, K = N = 4096 and 8192): M = 16: swap-AB 64x16x256 5.5 us
    # (~3x cuBLAS _scaled_mm); M = 128: TMA 64x128x128 8.4 us; M >= 1024: TMA 128x256x128 with the tile loop
    # flattened (the next tile's loads overlap this tile's epilogue) 1330-1470 TFLOP/s, 1.05-1.2x cuBLAS.
    if M <= 64:
        block_tok = max(16, next_power_of_2(M))
        return {"SWAP_AB": True, "TMA": False, "BLOCK_M": 64, "BLOCK_N": block_tok, "BLOCK_K": 256,
                "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
    if M <= 256:
        return {"SWAP_AB": False, "TMA": True, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128,
                "GROUP_M": 8, "num_warps": 4, "num_stages": 5, "FLATTEN": False}
    return {"SWAP_AB": False, "TMA": True, "BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128,
            "GROUP_M": 8, "num_warps": 8, "num_stages": 3, "FLATTEN": True}


def candidate_configs(M: int, N: int, K: int) -> list[dict]:
    """Configs worth timing for this shape (the benchmark prints them all; autotune picks among them)."""
    if M <= 64:
        tok = max(16, next_power_of_2(M))
        out = []
        if M <= 16:
            for bn, bk, warps in GEMV_CANDIDATES:
                for per_sm in (1, 2):
                    # 3 stages (kernels/gemm.py LOAD_STAGES): the K loop pipelined through shared memory, two K
                    # blocks in flight during one block's math, for the tiles that walk several K blocks. H200
                    # (sweeps/fp8_stages*): the table's pick at K > 4096 (GEMV_TILE); at K4096 N14336 32 x 512 stays
                    # unstaged (5.97 against 5.7 TFLOP/s), whole-K tiles have nothing to pipeline
                    for stages in ((1, 3) if M == 1 and cdiv(K, bk) > 2 else (1,)):
                        cfg = _gemv_cfg(M, N, K, bn, bk, warps, per_sm, stages)
                        if cfg not in out:
                            out.append(cfg)
            for bn, bk, stages, per_sm in SPLIT_SWAPAB_CANDIDATES:
                cfg = _split_swapab_cfg(M, N, K, bn, bk, stages, per_sm)
                if cfg not in out:
                    out.append(cfg)
        for bm, bk, warps, stages in [(64, 256, 4, 4), (64, 128, 4, 6), (128, 128, 4, 4), (128, 256, 8, 3)]:
            out.append({"SWAP_AB": True, "TMA": False, "BLOCK_M": bm, "BLOCK_N": tok, "BLOCK_K": bk,
                        "GROUP_M": 1, "num_warps": warps, "num_stages": stages})
        out.append({"SWAP_AB": False, "TMA": True, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128,
                    "GROUP_M": 8, "num_warps": 4, "num_stages": 5, "FLATTEN": False})
        return out
    out = []
    for bm, bn, bk, warps, stages in [(128, 256, 128, 8, 3), (128, 256, 64, 8, 4), (128, 128, 128, 8, 4),
                                      (128, 128, 128, 4, 4), (128, 128, 64, 4, 5), (64, 128, 128, 4, 5),
                                      (256, 128, 128, 8, 3)]:
        for flatten in (False, True):
            out.append({"SWAP_AB": False, "TMA": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                        "GROUP_M": 8, "num_warps": warps, "num_stages": stages, "FLATTEN": flatten})
    out.append({"SWAP_AB": False, "TMA": False, "BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128,
                "GROUP_M": 8, "num_warps": 8, "num_stages": 3})
    out.append({"SWAP_AB": False, "TMA": False, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128,
                "GROUP_M": 8, "num_warps": 8, "num_stages": 4})
    return out


def config_str(cfg: dict) -> str:
    if cfg.get("impl") in ("gemv", "swapab"):
        return (f"{cfg['impl']} BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} BLOCK_K={cfg['BLOCK_K']} "
                f"split_k={cfg['SPLIT_K']} warps={cfg['num_warps']}"
                + (f" stages={cfg['num_stages']}" if cfg["impl"] == "swapab" or cfg["num_stages"] > 1 else ""))
    kind = "tma" if cfg.get("TMA") else "ptr"
    s = (f"{kind} BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} BLOCK_K={cfg['BLOCK_K']} "
         f"warps={cfg['num_warps']} stages={cfg['num_stages']}")
    if cfg.get("SWAP_AB"):
        s += " swap_ab"
    if cfg.get("FLATTEN"):
        s += " flatten"
    return s


def _flat_scale(scale: torch.Tensor, n: int, what: str) -> tuple[torch.Tensor, int]:
    """A scale as a 1-D fp32 tensor and its element stride: 0 for one scalar broadcast, 1 per row/column."""
    if scale.dtype != torch.float32:
        raise ValueError(f"{what} must be float32, got {scale.dtype}")
    flat = scale.reshape(-1)
    if flat.numel() == 1:
        return flat, 0
    if flat.numel() != n:
        raise ValueError(f"{what} must be a scalar or hold {n} values, got shape {tuple(scale.shape)}")
    return flat.contiguous(), 1


def _tma_ok(a: torch.Tensor, b_nk: torch.Tensor, c: torch.Tensor) -> bool:
    """TMA descriptors need 16-byte aligned bases and row strides and a contiguous last dimension."""
    for t in (a, b_nk, c):
        if t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return a.shape[1] % 16 == 0


def _launch(a, b, sa, sb, bias, c, cfg, bias_along_m=False):
    """c[M, N] = a[M, K] @ b[K, N] * sa * sb (+ bias), all checks done; picks the TMA or pointer kernel.

    Returns the launched compiled kernel (the GPU test reads its PTX)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = b.shape[1]
    sa_flat, stride_sa = sa
    sb_flat, stride_sb = sb
    has_bias = bias is not None
    bias_arg = bias if has_bias else sa_flat
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    b_nk = b.t()
    if cfg.get("TMA") and not bias_along_m and _tma_ok(a, b_nk, c):
        if a.is_cuda:
            num_sms = sm_count(a.device)
        else:
            num_sms = 4  # the interpreter: a few programs still walk several tiles each
        tiles = cdiv(M, BM) * cdiv(N, BN)
        grid = (min(num_sms, tiles),)
        a_desc = TensorDescriptor.from_tensor(a, [BM, BK])
        b_desc = TensorDescriptor.from_tensor(b_nk, [BN, BK])
        c_desc = TensorDescriptor.from_tensor(c, [BM, BN])
        return _fp8_gemm_tma_kernel[grid](a_desc, b_desc, c_desc, sa_flat, sb_flat, bias_arg, M, N, K,
                                   stride_sa, stride_sb, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                                   GROUP_M=cfg.get("GROUP_M", 8), NUM_SMS=grid[0], HAS_BIAS=has_bias,
                                   FLATTEN=bool(cfg.get("FLATTEN", False)),
                                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    grid = (cdiv(M, BM) * cdiv(N, BN),)
    return _fp8_gemm_kernel[grid](a, b, c, sa_flat, sb_flat, bias_arg, M, N, K,
                           a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                           stride_sa, stride_sb, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                           GROUP_M=cfg.get("GROUP_M", 8), HAS_BIAS=has_bias, BIAS_ALONG_M=bias_along_m,
                           EVEN_K=K % BK == 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _gemm(a, b, sa, sb, bias, out_dtype, config, out, who):
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = torch.empty((M, N), device=a.device, dtype=out_dtype)
    elif out.shape != (M, N) or out.dtype != out_dtype or out.device != a.device:
        raise ValueError(f"{who}: out must be [{M}, {N}] {out_dtype} on {a.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.zero_()
        if bias is not None:
            out += bias
        return out
    cfg = dict(config) if config is not None else select_config(M, N, K)
    if cfg.get("impl") in ("gemv", "swapab"):
        # kernels/gemm.py's gemv / split-K swap-AB on the codes: w = b.T is the [N, K] weight; the epilogue
        # scales by sa then sb
        w = b.t()
        return _single_pass(a, w, w, bias, out, cfg, 0, scales=(sa, sb))
    if cfg.get("SWAP_AB"):
        # out.T [N, M] = b.T [N, K] @ a.T [K, M]: the weight rows take the wide side of the tensor-core tile
        _launch(b.t(), a.t(), sb, sa, bias, out.t(), cfg, bias_along_m=True)
    else:
        _launch(a, b, sa, sb, bias, out, cfg)
    return out


def _check_bias(bias, N, device, who):
    if bias is None:
        return None
    if bias.shape != (N,) or bias.device != device:
        raise ValueError(f"{who}: bias must be [{N}] on {device}, got {tuple(bias.shape)} on {bias.device}")
    return bias.contiguous()


def fp8_scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
                  config: Optional[dict] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(a @ b) * scale_a * scale_b (+ bias) in out_dtype; the torch._scaled_mm contract (see module doc)."""
    who = "fp8_scaled_mm"
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"{who}: need a [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise ValueError(f"{who}: a and b must be {FP8_DTYPE}, got {a.dtype} and {b.dtype}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{who}: out_dtype must be bf16, fp16 or fp32, got {out_dtype}")
    if a.device != b.device:
        raise ValueError(f"{who}: a and b on different devices ({a.device}, {b.device})")
    M, N = a.shape[0], b.shape[1]
    sa = _flat_scale(scale_a, M, f"{who}: scale_a")
    sb = _flat_scale(scale_b, N, f"{who}: scale_b")
    bias = _check_bias(bias, N, a.device, who)
    return _gemm(a, b, sa, sb, bias, out_dtype, config, out, who)


def fp8_scaled_mm_ref(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    M, N = a.shape[0], b.shape[1]
    sa = scale_a.float().reshape(-1, 1) if scale_a.numel() != 1 else scale_a.float().reshape(())
    sb = scale_b.float().reshape(1, -1) if scale_b.numel() != 1 else scale_b.float().reshape(())
    y = (a.float() @ b.float()) * sa * sb
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(M, N)


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
               config: Optional[dict] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [M, N] = quant_rows(x) @ w_fp8.T * x_scale * w_scale (+ bias), in x's dtype."""
    who = "fp8_linear"
    if x.dim() != 2 or w_fp8.dim() != 2 or x.shape[1] != w_fp8.shape[1]:
        raise ValueError(f"{who}: need x [M, K] and w_fp8 [N, K], got {tuple(x.shape)} and {tuple(w_fp8.shape)}")
    if w_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"{who}: w_fp8 must be {FP8_DTYPE}, got {w_fp8.dtype}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{who}: x must be bf16, fp16 or fp32, got {x.dtype}")
    if x.device != w_fp8.device or w_scale.device != x.device:
        raise ValueError(f"{who}: x, w_fp8 and w_scale must be on one device")
    N = w_fp8.shape[0]
    sb = _flat_scale(w_scale, N, f"{who}: w_scale")
    bias = _check_bias(bias, N, x.device, who)
    x_fp8, x_scale = quantize_rows_fp8(x)
    sa = _flat_scale(x_scale, x.shape[0], f"{who}: x_scale")
    return _gemm(x_fp8, w_fp8.t(), sa, sb, bias, x.dtype, config, out, who)


def fp8_linear_ref(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The eager form: quantize x rows, upcast both to fp32, matmul, scale, add bias, cast to x.dtype."""
    x_fp8, x_scale = quantize_rows_fp8_ref(x)
    y = (x_fp8.float() @ w_fp8.float().t()) * x_scale * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_linear_prequant(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
                        config: Optional[dict] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp8_linear on an input quantized already (by rmsnorm_quant_fp8): y [M, N] = x_fp8 @ w_fp8.T * x_scale
    * w_scale (+ bias) in out_dtype; x_fp8 [M, K] e4m3, x_scale [M, 1] fp32, w_fp8 [N, K], w_scale [N]."""
    who = "fp8_linear_prequant"
    if x_fp8.dim() != 2 or w_fp8.dim() != 2 or x_fp8.shape[1] != w_fp8.shape[1]:
        raise ValueError(f"{who}: need x_fp8 [M, K] and w_fp8 [N, K], got {tuple(x_fp8.shape)} and "
                         f"{tuple(w_fp8.shape)}")
    if x_fp8.dtype != FP8_DTYPE or w_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"{who}: x_fp8 and w_fp8 must be {FP8_DTYPE}, got {x_fp8.dtype} and {w_fp8.dtype}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{who}: out_dtype must be bf16, fp16 or fp32, got {out_dtype}")
    if len({x_fp8.device, x_scale.device, w_fp8.device, w_scale.device}) != 1:
        raise ValueError(f"{who}: x_fp8, x_scale, w_fp8 and w_scale must be on one device")
    N = w_fp8.shape[0]
    sa = _flat_scale(x_scale, x_fp8.shape[0], f"{who}: x_scale")
    sb = _flat_scale(w_scale, N, f"{who}: w_scale")
    bias = _check_bias(bias, N, x_fp8.device, who)
    return _gemm(x_fp8, w_fp8.t(), sa, sb, bias, out_dtype, config, out, who)


def fp8_linear_prequant_ref(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor,
                            w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                            out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """fp8_linear_ref after its quantization, op for op (so fused and unfused reference paths agree bitwise)."""
    y = (x_fp8.float() @ w_fp8.float().t()) * x_scale * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
