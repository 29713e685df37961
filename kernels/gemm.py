"""GEMM with a fused epilogue: y = act(x @ w.T + bias), or the SwiGLU gate silu(x @ w.T) * (x @ w_up.T).

Algorithm (the Triton matmul tutorial, plus an epilogue and an optional second weight):
  - each program owns a BLOCK_M x BLOCK_N output tile; programs are numbered in GROUP_M-tall column
    groups so that neighbouring programs share x rows and w columns in L2;
  - it walks K in BLOCK_K steps, loading one x tile and one w tile (two w tiles for "swiglu", which
    share that x tile) and accumulating with tl.dot in fp32 (IEEE fp32 dot for fp32 inputs);
  - the epilogue adds the bias, applies the activation in fp32 and rounds once to x's dtype;
  - decode shapes (few rows, a long K) split K over SPLIT_K programs that write fp32 partial tiles,
    and a second small kernel sums the partials and applies the same epilogue.

The gemv (``config={"impl": "gemv", ...}``; decode rows, M of 1 to 16): at batch 1 a linear layer is a
stream of its weight bytes, and tl.dot's 16-row tiles only add work, so this kernel uses FMAs:
  - each program owns BLOCK_N weight rows (output columns), all BLOCK_M x rows and one K slice; it
    loads [BLOCK_N, BLOCK_K] weight tiles (K contiguous: 16-byte vectors, a warp reads 512 contiguous
    bytes of a row) and multiplies them by the x rows broadcast along n, in fp32;
  - products are summed in-thread over each 16-byte vector and carried as a
    [BLOCK_M, BLOCK_N, BLOCK_K / VEC] fp32 accumulator; the cross-thread sum runs once, after the loop;
  - swiglu reads each x tile once for both weights; the epilogue is the tiled kernel's (fp32, one
    rounding);
  - split-K is single-pass: each K slice stores its fp32 partial and bumps the output tile's arrival
    counter (acq_rel atomic; counters from kernels/workspace.py); the last slice to arrive sums the
    partials in slice order (deterministic), runs the epilogue, writes out and re-arms the counter to 0.
    No second kernel, no second launch.
  sm_90 SASS (triton 3.6, bf16, compiled offline): no shared memory or barrier in the K loop; per thread
  and K block, the weight's 128-bit loads plus one per x row (x is loaded once per thread, not per n).
  Loop instructions per weight element: 3.3 at M=1 (32 x 512 tile), 7.9 at M=4, 16 at M=8, 38 at
  M=16. At 3 TB/s an SM must consume ~6.5 bf16 weights per cycle, so issue stays well under the
  4 warp-instructions per cycle up to M=4, nears the limit at M=8, and caps M=16 near 1.5 TB/s (the
  tiled kernel should keep M=16). Measured on the H200 at M=1 (gemm-h200.json): ahead of cuBLAS at QKV
  and swiglu, level at the down projection, so `select_config` picks it at M=1 (GEMV_MAX_M = 1);
  `candidate_configs` offers it for M <= 16. Its loop is a `tl.range` whose num_stages (LOAD_STAGES) is the
  config's: at 1 not pipelined (each program's one K block of loads is all it has in flight; 16-row x 1024 tiles
  of 32 KB, 3.4-4.2 TB/s at QKV, down, swiglu on the H200); at 3 Triton pipelines it through shared memory by
  cp.async, x one row per K block, two K blocks in flight during one block's math (offline sm_90a, fp8 32 x 512 x 3
  stages: 415 loop instructions against 384, 9 cp.async per K block, 93 registers). The table runs 3 stages for one
  bf16 weight at one row over > 2 K blocks (_GEMV_STAGED: 1.08x at the down projection) and for the fp8 gemv at
  K > 4096 (kernels/fp8_gemm.py GEMV_TILE).

The swap-AB kernel (``config={"impl": "swapab", ...}``; decode rows, M <= 16): the tiled kernel's 16-row
tiles put the few x rows on the tensor core's M side, which sm_90 can only feed to mma.sync (wgmma's M
unit is 64 rows). Swapping the operands, as the fp8 decode kernel does, computes out^T = W @ x^T:
  - each program owns BLOCK_N weight rows (output columns, 64 or 128: one or two wgmma m64 units of a
    4-warp warpgroup) x BLOCK_M = 16 padded x rows (wgmma's n16) and one K slice;
  - per K block it loads a [BLOCK_N, BLOCK_K] weight tile (K contiguous, 16-byte vectors) and x^T as a
    [BLOCK_K, BLOCK_M] tile through transposed strides (rows past M masked to zero, not re-read), and
    accumulates ``tl.dot(w_tile, xT_tile, acc)`` in fp32; swiglu's up tile shares the x^T tile;
  - num_stages > 1 makes Triton pipeline both loads (cp.async into num_stages shared buffers; the
    loop waits for the oldest K block, so num_stages - 2 to num_stages - 1 blocks stay in flight
    while wgmma runs): the weight stream never waits for the math;
  - the epilogue (bias along the rows, activation in fp32, one rounding) runs on the transposed
    accumulator and stores through transposed output strides; split-K is the gemv's single pass.
  No TMA: the fp8 decode kernel's measured swap-AB design is the pointer kernel, and the loop's issue
  cost is already small (below). Unmeasured on a GPU: `select_config` does not pick it (SWAPAB_MAX_M = 0);
  `candidate_configs` offers it for M <= 16. The kernel takes BLOCK_M 32/64 too (wgmma n32/n64).

Offline sm_90a compile analysis (triton 3.6 + its ptxas, CPU only: NOT timings; bf16, 4 warps). instr/elem =
warp-instructions of the K loop's SASS per weight element (the issue cost of streaming a weight; at 3 TB/s an
SM consumes ~6.5 bf16 weights per cycle and issues up to 4 warp-instructions per cycle, so the budget is
~0.6); CTAs/SM from shared memory and registers; in flight = KB of weight loads an SM has outstanding (async:
CTAs x (num_stages - 2 .. num_stages - 1) tiles, continuously; sync: up to CTAs x one tile, issued at the
top of each K block and drained before the next; ~20-30 KB are needed for ~3 TB/s).

  shape                      config (BLOCK_N x BLOCK_K, stages, split)    regs  smem KB CTAs/SM instr/elem in flight KB
  M1 swiglu K4096 N14336     swapab 64x128 s3 split1-4 (table row)        88-96   108     2      0.043    64-128 async
  M1 swiglu K4096 N14336     swapab 64x64 s4 split4                         64     72     3        -      96-144 async
  M1 swiglu K4096 N14336     swapab 128x64 s3 split8                        96    102     2        -      64-128 async
  M4 bias / M16 K4096 N6144  swapab 64x128 s4 split1-8 (table row)          56     80     2      0.055    64-96 async
  M4 bias / M16 K4096 N6144  swapab 64x64 s5 split8                         40     50     4      0.076    96-128 async
  M4 bias / M16 K4096 N6144  swapab 128x64 s6 split16                       56    108     2        -     128-160 async
  M16 K4096 N6144            swapab 128x128 s3 split8                      105    108     2      0.042    64-128 async
  M16 K4096 N6144            swapab 64x256 s3 split4                        96    120     1        -      32-64 async
  M1 swiglu K4096 N14336     gemv 16x512 (table row)                       127    0.1     4      0.106   <=128 sync
  M4 bias K4096 N6144        gemv 8x1024 (table row)                       119    0.5     4      0.247    <=64 sync
  M16 K4096 N6144            gemv 2x1024 (table row)                       116    0.5     4      1.197    <=16 sync
  M16 K4096 N6144            tiled 16x64x128 s5 split2 (select_config now)  64     80     2      0.054   async (mma.sync)

Every swapab candidate compiles without spills (wgmma m64n16k16; the TTGIR has the weight and x^T loads as
ttg.async_copy_global_to_local, 16-byte cp.async in the PTX). At M = 1 the x^T copies of rows past M are
zero-fills (no memory traffic, a quarter of the copy instructions at BLOCK_N 64). The swapab loop costs the
same at M = 1 and 16 (the tensor core does the rows), the gemv's grows with M and passes the budget at
M = 16. Note that offline the tiled kernel's decode config looks about as good (pipelined, same issue cost,
mma.sync + ldmatrix instead of wgmma), so its slow QKV measurement (90-126 us for 50 MB) is not explained by
these numbers: its split-K second kernel and partials allocation, or host time inside do_bench, are
candidates (bench_gemm.py --graph times by CUDA-graph replay). Expected for swapab: the weight stream
limited by HBM rather than by issue or latency at every M <= 16; measure with bench_gemm.py --tune --graph.

Layouts: x [M, K] with any strides (a row-strided view of a wider buffer is fine); w and w_up [N, K]
(nn.Linear layout) with any strides, e.g. a transposed [K, N] buffer's .T; bias [N]; out [M, N] with
any strides. fp16, bf16 and fp32; x, w and w_up share one dtype and the output has it too.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .host import cdiv, next_power_of_2
from .pdl import launch_kwargs, use_pdl
from .tile_order import tile_coords
from .workspace import arrival_counters, split_k_gather

ACTIVATIONS = ("none", "silu", "gelu", "gelu_tanh", "swiglu")
_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CONFIG_KEYS = ("impl", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "num_warps", "num_stages")
IMPLS = ("tiled", "gemv", "swapab")  # a config without "impl" (e.g. one tuned before the gemv existed) is "tiled"


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _activation(g, u, ACT: tl.constexpr):
    """The epilogue on fp32 values; `u` is only read for swiglu (ACT == 4)."""
    if ACT == 1:  # silu
        g = g / (1.0 + tl.exp(-g))
    elif ACT == 2:  # gelu, erf form (F.gelu's default)
        g = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == 3:  # gelu, tanh form; tanh(z) = 1 - 2 / (1 + exp(2z)) saturates cleanly at +-inf
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        g = 0.5 * g * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * z)))
    elif ACT == 4:  # swiglu: silu(gate) * up
        g = g / (1.0 + tl.exp(-g)) * u
    return g


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, wu_ptr, b_ptr, y_ptr, part_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_un, stride_uk, stride_ym, stride_yn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    SWIGLU: tl.constexpr = ACT == 4
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M / columns past N wrap onto valid ones: loads need no M/N mask, the store masks them.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    k_start = pid_k * K_PER_SPLIT
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    w_ptrs = w_ptr + rn[None, :] * stride_wn + (k_start + offs_k)[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    if SWIGLU:
        u_ptrs = wu_ptr + rn[None, :] * stride_un + (k_start + offs_k)[:, None] * stride_uk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K_PER_SPLIT, BLOCK_K)):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wt = tl.load(w_ptrs)
        else:
            k_left = tl.minimum(K - k_start, K_PER_SPLIT) - kt * BLOCK_K
            xt = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            wt = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if IEEE:
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)
        if SWIGLU:
            if EVEN_K:
                ut = tl.load(u_ptrs)
            else:
                ut = tl.load(u_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if IEEE:
                acc_u = tl.dot(xt, ut, acc_u, input_precision="ieee")
            else:
                acc_u = tl.dot(xt, ut, acc_u)
            u_ptrs += BLOCK_K * stride_uk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
        out = _activation(acc, acc_u, ACT)
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # fp32 partials, laid out [2 (gate, up), SPLIT_K, M, N] contiguous; the reduce kernel finishes.
        p_ptrs = part_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(p_ptrs, acc, mask=mask)
        if SWIGLU:
            tl.store(p_ptrs + SPLIT_K * M * N, acc_u, mask=mask)


@triton.jit
def _split_k_reduce_kernel(
    part_ptr, b_ptr, y_ptr, M, N, stride_ym, stride_yn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(SPLIT_K):
        p = part_ptr + (s * M + m).to(tl.int64) * N + offs_n
        acc += tl.load(p, mask=nmask, other=0.0)
        if ACT == 4:
            acc_u += tl.load(p + SPLIT_K * M * N, mask=nmask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    out = _activation(acc, acc_u, ACT)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n.to(tl.int64) * stride_yn,
             out.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _gemv_store(g, u, b_ptr, y_ptr, offs_m, offs_n, rn, M, N, stride_ym, stride_yn,
                ACT: tl.constexpr, HAS_BIAS: tl.constexpr, sa_ptr=None, sb_ptr=None, stride_sa=0, stride_sb=0,
                SCALED: tl.constexpr = False):
    """The gemv's epilogue on [BLOCK_M, BLOCK_N] fp32 sums: (SCALED: times sa[m], then sb[n], as the fp8 GEMM's
    epilogue), bias, activation, one rounding, masked store."""
    if SCALED:
        sa = tl.load(sa_ptr + (offs_m % M) * stride_sa)
        sb = tl.load(sb_ptr + rn * stride_sb)
        g = g * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        g += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    out = _activation(g, u, ACT)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, wu_ptr, b_ptr, y_ptr, pg_ptr, pu_ptr, cnt_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_un, stride_uk, stride_ym, stride_yn, stride_ps,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
    PDL: tl.constexpr = False, sa_ptr=None, sb_ptr=None, stride_sa=0, stride_sb=0, SCALED: tl.constexpr = False,
    LOAD_STAGES: tl.constexpr = 1,
):
    """SCALED (kernels/fp8_gemm.py's decode rows): x and w are e4m3 codes, exact in fp32, and the sums are scaled
    by sa[m] (stride_sa 0: one scale) and sb[n] before the bias. LOAD_STAGES > 1 (candidates): the K loop is a
    tl.range that Triton software-pipelines, its loads cp.async'd into LOAD_STAGES shared buffers, LOAD_STAGES - 1
    K blocks ahead of the math; 1 is the plain loop (one K block in flight)."""
    if PDL:  # kernels/pdl.py: let the next PDL launch start early, then wait for the kernel before this one
        gdc_launch_dependents()
        gdc_wait()
    SWIGLU: tl.constexpr = ACT == 4
    tile = tl.program_id(0)  # n-blocks fastest: neighbouring programs share the x rows
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_m = (tile // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M / columns past N wrap onto valid ones: loads need no M/N mask, the stores mask them.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    w_ptrs = w_ptr + rn[:, None] * stride_wn + (k_lo + offs_k)[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
    if SWIGLU:
        u_ptrs = wu_ptr + rn[:, None] * stride_un + (k_lo + offs_k)[None, :] * stride_uk
    # x as a [BLOCK_M, BLOCK_N, BLOCK_K] tile constant along n: its load gets the w tile's thread layout
    # (a [BLOCK_M, BLOCK_K] load got its own, converted through shared memory with 4 barriers per K
    # block in sm_90 compiles), and the compiled code still loads each x vector once per thread. Pipelined
    # (LOAD_STAGES > 1): [BLOCK_M, 1, BLOCK_K], one x row per K block through shared memory, broadcast along n after.
    x_ptrs = x_ptr + rm[:, None, None] * stride_xm + (k_lo + offs_k)[None, None, :] * stride_xk
    if LOAD_STAGES == 1:
        x_ptrs += 0 * offs_n[None, :, None]

    # k = VEC * c + v (VEC = 16 bytes of elements, one vector load): the products are summed over v
    # inside a thread (an FMA chain) and [BLOCK_M, BLOCK_N, BLOCK_K / VEC] fp32 sums are carried; the
    # cross-thread sum over c runs once, after the K loop.
    C: tl.constexpr = BLOCK_K // VEC
    acc = tl.zeros((BLOCK_M, BLOCK_N, C), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N, C), dtype=tl.float32)
    # Every K block in [k_lo, k_hi) is whole when BLOCK_K divides K (K_PER_SPLIT is a multiple of it).
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOAD_STAGES):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wt = tl.load(w_ptrs)
        else:
            kmask = (k0 + offs_k < k_hi)[None, :]
            xt = tl.load(x_ptrs, mask=kmask[None, :, :], other=0.0)
            wt = tl.load(w_ptrs, mask=kmask, other=0.0)
        xf = tl.reshape(xt.to(tl.float32), (BLOCK_M, xt.shape[1], C, VEC))
        acc += tl.sum(xf * tl.reshape(wt.to(tl.float32), (1, BLOCK_N, C, VEC)), axis=3)
        if SWIGLU:  # the up projection reuses the x tile already in registers
            if EVEN_K:
                ut = tl.load(u_ptrs)
            else:
                ut = tl.load(u_ptrs, mask=kmask, other=0.0)
            acc_u += tl.sum(xf * tl.reshape(ut.to(tl.float32), (1, BLOCK_N, C, VEC)), axis=3)
            u_ptrs += BLOCK_K * stride_uk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    g = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    u = tl.sum(acc_u, axis=2)

    if SPLIT_K == 1:
        _gemv_store(g, u, b_ptr, y_ptr, offs_m, offs_n, rn, M, N, stride_ym, stride_yn, ACT, HAS_BIAS,
                    sa_ptr, sb_ptr, stride_sa, stride_sb, SCALED)
    else:
        # Single-pass split-K (kernels/workspace.py): fp32 partials [SPLIT_K, M, N] (gate in pg, up in pu,
        # stride_ps = M * N); the slice that arrives last runs the epilogue on the sums.
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        rows = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        last, g, u = split_k_gather(g, u, pg_ptr, pu_ptr, cnt_ptr, tile, pid_k, rows, mask, stride_ps,
                                    SPLIT_K, SWIGLU)
        if last:
            _gemv_store(g, u, b_ptr, y_ptr, offs_m, offs_n, rn, M, N, stride_ym, stride_yn, ACT, HAS_BIAS,
                        sa_ptr, sb_ptr, stride_sa, stride_sb, SCALED)


@triton.jit
def _swapab_store(g, u, b_ptr, y_ptr, offs_m, offs_n, rn, M, N, stride_ym, stride_yn,
                  ACT: tl.constexpr, HAS_BIAS: tl.constexpr, sa_ptr=None, sb_ptr=None, stride_sa=0, stride_sb=0,
                  SCALED: tl.constexpr = False):
    """The swap-AB epilogue on transposed [BLOCK_N, BLOCK_M] fp32 sums (rows are output columns): (SCALED: times
    sa[m], then sb[n], as _gemv_store), bias along the rows, the activation, one rounding, a masked store through
    transposed output strides."""
    if SCALED:
        sa = tl.load(sa_ptr + (offs_m % M) * stride_sa)
        sb = tl.load(sb_ptr + rn * stride_sb)
        g = g * sa[None, :] * sb[:, None]
    if HAS_BIAS:
        g += tl.load(b_ptr + rn).to(tl.float32)[:, None]
    out = _activation(g, u, ACT)
    y_ptrs = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None].to(tl.int64) * stride_yn
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))


@triton.jit
def _gemm_swapab_kernel(
    x_ptr, w_ptr, wu_ptr, b_ptr, y_ptr, pg_ptr, pu_ptr, cnt_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_un, stride_uk, stride_ym, stride_yn, stride_ps,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    sa_ptr=None, sb_ptr=None, stride_sa=0, stride_sb=0, SCALED: tl.constexpr = False,
):
    """out^T [BLOCK_N, BLOCK_M] = W [BLOCK_N, K] @ x^T [K, BLOCK_M]: the weight rows are the tensor-core
    tile's M side (wgmma's 64-row unit), the few x rows its N side. SCALED (kernels/fp8_gemm.py's decode rows):
    x and w are e4m3 codes (wgmma e4m3, fp32 accumulation) and the epilogue scales as the gemv's does."""
    SWIGLU: tl.constexpr = ACT == 4
    tile = tl.program_id(0)  # n-blocks fastest: neighbouring programs share the x rows
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_m = (tile // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Weight rows past N wrap onto valid ones (no mask on the weight loads; the stores mask them). x rows
    # past M are masked to zero instead: at M = 1 a wrapped x^T tile would read one row BLOCK_M times.
    rn = (offs_n % N).to(tl.int64)
    m_ok = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * K_PER_SPLIT
    k_len = tl.minimum(K - k_lo, K_PER_SPLIT)
    w_ptrs = w_ptr + rn[:, None] * stride_wn + (k_lo + offs_k)[None, :] * stride_wk  # [BLOCK_N, BLOCK_K]
    if SWIGLU:
        u_ptrs = wu_ptr + rn[:, None] * stride_un + (k_lo + offs_k)[None, :] * stride_uk
    # x^T [BLOCK_K, BLOCK_M] through transposed strides: K-contiguous columns (16-byte vectors along K)
    xt_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + (k_lo + offs_k)[:, None] * stride_xk

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kt in range(0, tl.cdiv(k_len, BLOCK_K)):
        if EVEN_K:
            xt = tl.load(xt_ptrs, mask=m_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs)
        else:
            k_left = k_len - kt * BLOCK_K
            xt = tl.load(xt_ptrs, mask=(offs_k[:, None] < k_left) & m_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        if IEEE:
            acc = tl.dot(wt, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(wt, xt, acc)
        if SWIGLU:  # the up projection shares the x^T tile
            if EVEN_K:
                ut = tl.load(u_ptrs)
            else:
                ut = tl.load(u_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            if IEEE:
                acc_u = tl.dot(ut, xt, acc_u, input_precision="ieee")
            else:
                acc_u = tl.dot(ut, xt, acc_u)
            u_ptrs += BLOCK_K * stride_uk
        xt_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if SPLIT_K == 1:
        _swapab_store(acc, acc_u, b_ptr, y_ptr, offs_m, offs_n, rn, M, N, stride_ym, stride_yn, ACT, HAS_BIAS,
                      sa_ptr, sb_ptr, stride_sa, stride_sb, SCALED)
    else:
        # Single-pass split-K, as the gemv's, on the transposed [BLOCK_N, BLOCK_M] tiles.
        mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
        cols = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]  # [BLOCK_N, BLOCK_M], contiguous along n
        last, g, u = split_k_gather(acc, acc_u, pg_ptr, pu_ptr, cnt_ptr, tile, pid_k, cols, mask, stride_ps,
                                    SPLIT_K, SWIGLU)
        if last:
            _swapab_store(g, u, b_ptr, y_ptr, offs_m, offs_n, rn, M, N, stride_ym, stride_yn, ACT, HAS_BIAS,
                          sa_ptr, sb_ptr, stride_sa, stride_sb, SCALED)


# --------------------------------------------------------------------------------------------------
# Configs: the one shape -> config table of this family
# --------------------------------------------------------------------------------------------------
_SMS = 132  # H100 SXM; split-K aims to give every SM at least one program.
# Shared memory one program may take for its pipeline buffers (bytes) so that two programs fit an SM
# (228 KB per SM on Hopper, 1 KB reserved per program); decode kernels want two resident programs.
_SMEM_TWO_PER_SM = 110 * 1024


def _cfg(bm, bn, bk, warps, stages, group=8, split=1) -> dict:
    return {"impl": "tiled", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "SPLIT_K": split,
            "num_warps": warps, "num_stages": stages}


def _gemv_cfg(bm, bn, bk, warps, split=1, stages=1) -> dict:
    # num_stages is the K loop's LOAD_STAGES (1: the plain loop, one K block in flight)
    return {"impl": "gemv", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "SPLIT_K": split,
            "num_warps": warps, "num_stages": stages}


def _stages(bm: int, bn: int, bk: int, weights: int, elem: int, budget: int, most: int = 5) -> int:
    """Deepest pipeline within `budget` bytes: Triton keeps num_stages - 1 buffers of one x tile and
    `weights` w tiles (seen in sm_90 compiles: 16x64x128 swiglu, 5 stages = 144 KB)."""
    per_stage = (bm * bk + weights * bk * bn) * elem
    return max(2, min(most, 1 + budget // per_stage))


def _split_k(M: int, N: int, K: int, bm: int, bn: int, bk: int) -> int:
    """K splits so that the grid fills the SMs about twice (two resident programs each), while every
    split keeps >= 8 K tiles; 1 when the output tiles alone already cover the SMs."""
    tiles = cdiv(M, bm) * cdiv(N, bn)
    return max(1, min(16, (2 * _SMS) // tiles, K // (8 * bk)))


# The gemv's table: rows per program (next power of two of M) -> (BLOCK_N, BLOCK_K in bytes of one weight
# row, warps) for [one weight, swiglu's two]. Why these: each thread reads 16-byte vectors and a warp
# 512 contiguous bytes of a weight row; with BLOCK_K * elem = 2 KB on 4 warps the warps sit side by side
# along K, which is the layout where x rows (BLOCK_M > 1) need no shared-memory conversion per K block
# (at M = 1 any K width is conversion-free). BLOCK_N shrinks as rows grow to keep the
# BLOCK_M x BLOCK_N x BLOCK_K/VEC accumulator in registers. Register counts from sm_90 compiles
# (triton 3.6, bf16, no spills): see candidate_configs. M=1 measured on the H200 (2026-11-29, bench_gemm.py --tune
# --graph --ms 1, gemm-h200.json): 16 x 1024 bf16 (plain) 14.75 us at QKV K=4096 N=6144 (cuBLAS 15.98) and
# 31.45 us at the down projection K=14336 N=4096 (cuBLAS 31.70); 32 x 256 (swiglu) 56.5 us at K=4096 N=14336
# (cuBLAS + Inductor's silu-mul 63.3, the tiled kernel 61.2). M > 1 rows: unmeasured (GEMV_MAX_M = 1).
_GEMV_TILE = {1: ((16, 2048, 4), (32, 512, 4)),    # 99 / 99 registers per thread; the H200 sweep's best
              2: ((16, 2048, 4), (8, 2048, 4)),    # 117 / 117
              4: ((8, 2048, 4), (4, 2048, 4)),     # 121 / 128
              8: ((4, 2048, 4), (2, 2048, 4)),     # 127 / 128
              16: ((2, 2048, 4), (1, 2048, 4))}    # 116 / 112
# The table's pipelined tile (LOAD_STAGES = 3, two K blocks in flight during one block's math) by row count, one weight
# (not swiglu), taken where it runs unsplit over more than 2 K blocks (else _GEMV_TILE). One row: 16 x 1024 bytes x 3
# stages, H200 sweeps/gemv_stages (6e6e917, graph replay): 29.57 us at the down projection K14336 N4096 against 31.89
# for _GEMV_TILE's 16 x 2048 bytes (cuBLAS + Inductor 32.42), 14.63 against 14.91 at QKV K4096 N6144; the confirming
# run: sweeps/gemv_stages2. Unpipelined, the 1024-byte rows were slower (16.40 against 15.20 us at QKV).
_GEMV_STAGED = {1: (16, 1024, 4, 3)}
# What the --tune sweep tries besides the table's entry, same units, for [one weight, swiglu]; sm_90
# registers per thread in the comments (all <= 184: at least two 4-warp programs per SM, no spills, no
# shared memory or barrier in the K loop; their 3-stage copies at one row go through shared memory). Rows of 2 KB
# on 4 warps / 4 KB on 8 warps keep the warps along K.
_GEMV_CANDIDATES = {
    1: (((16, 1024, 4), (64, 512, 4), (16, 2048, 4), (64, 1024, 8), (128, 512, 8)),  # 72 99 99 138 130
        ((32, 512, 4), (64, 512, 4), (16, 2048, 4), (64, 1024, 8), (128, 512, 8))),  # 99 152 152 184 154
    2: (((8, 2048, 4), (32, 2048, 4), (16, 4096, 8)), ((16, 2048, 4), (16, 4096, 8))),  # 89 156 120; 153 153
    4: (((4, 2048, 4), (16, 2048, 4), (8, 4096, 8)), ((8, 2048, 4), (8, 4096, 8))),  # 96 145 137; 145 145
    8: (((8, 2048, 4), (8, 4096, 8)), ((4, 2048, 4),)),  # 178 178; 168
    16: (((4, 2048, 4), (4, 4096, 8)), ()),  # 144 144; swiglu: 2 columns already take 255 registers
}
# M <= GEMV_MAX_M runs the gemv (select_config) and, for plain GEMMs, Triton instead of cuBLAS
# (prefer_triton). 1: measured ahead of (or level with, at the down projection) cuBLAS and the tiled kernel
# at M=1 on the H200; larger M waits for a --tune run at --ms 4 / 16.
GEMV_MAX_M = 1


def _gemv_split_k(M: int, N: int, K: int, bm: int, bn: int, bk: int, per_sm: int = 1) -> int:
    """K slices (a power of two <= 16) until the grid holds `per_sm` programs per SM; every slice keeps >= 2 K
    blocks, since a slice's partials cost an fp32 write and read of its [M, N] outputs. The H200 sweep at
    M=1 (256-448 programs of the 16- and 32-row tiles) was fastest unsplit at all three Llama shapes:
    14.75 vs 17.79 us at QKV with 2 slices, 31.45 vs 33.07 at the down projection with 4."""
    return _fill_split_k(M, N, K, bm, bn, bk, per_sm, min_blocks=2)


def _fill_split_k(M: int, N: int, K: int, bm: int, bn: int, bk: int, per_sm: int, min_blocks: int) -> int:
    """The single-pass kernels' K split: double it (up to 16) while the grid holds fewer than `per_sm`
    programs per SM and each slice keeps >= `min_blocks` K blocks of `bk`."""
    programs = cdiv(M, bm) * cdiv(N, bn)
    split = 1
    while programs * split < per_sm * _SMS and split < 16 and K // (2 * split) >= min_blocks * bk:
        split *= 2
    return split


def _gemv_config(M: int, N: int, K: int, activation: str = "none", dtype: torch.dtype = torch.bfloat16) -> dict:
    """The gemv row of the table (used by select_config for M <= GEMV_MAX_M)."""
    bm = min(16, next_power_of_2(max(M, 1)))
    elem = torch.finfo(dtype).bits // 8
    if bm in _GEMV_STAGED and activation != "swiglu":
        bn, row_bytes, warps, stages = _GEMV_STAGED[bm]
        bk = row_bytes // elem
        split = _gemv_split_k(M, N, K, bm, bn, bk)
        if split == 1 and cdiv(K, bk) > 2:  # as measured: unsplit, several K blocks
            return _gemv_cfg(bm, bn, bk, warps, stages=stages)
    bn, row_bytes, warps = _GEMV_TILE[bm][activation == "swiglu"]
    bk = row_bytes // elem
    return _gemv_cfg(bm, bn, bk, warps, split=_gemv_split_k(M, N, K, bm, bn, bk))


def _swapab_cfg(bm, bn, bk, stages, split=1) -> dict:
    return {"impl": "swapab", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "SPLIT_K": split,
            "num_warps": 4, "num_stages": stages}


# The swap-AB kernel's tiles, (BLOCK_N weight rows, BLOCK_K, num_stages) for [one weight, swiglu's two], at
# BLOCK_M = 16 (decode rows) and 4 warps (one warpgroup: wgmma m64n16k16, BLOCK_N / 64 of them per k16).
# The first entry of each is the table's row (SWAPAB_MAX_M), the rest what the --tune sweep adds.
# sm_90 compiles keep num_stages buffers of (weights x BLOCK_N + BLOCK_M) x BLOCK_K elements in shared
# memory (the wgmma reads a buffer asynchronously, one more than tl.dot's mma.sync pipeline keeps) and
# num_stages - 2 to num_stages - 1 K blocks of cp.async loads in flight; shared memory decides the
# programs per SM (228 KB an SM). Per entry (bf16, sm_90 compiles, no spills): KB of shared memory per
# program, programs per SM, KB of weight in flight per SM (Little's law at ~3 TB/s over 132 SMs and ~1 us
# of latency wants ~20-30 KB). Speeds unmeasured.
_SWAPAB_TILES = {
    False: ((64, 128, 4),    # 80 KB, 2/SM, 64-96 KB in flight
            (64, 64, 5),     # 50 KB, 4/SM, 96-128
            (64, 256, 3),    # 120 KB, 1/SM, 32-64
            (128, 64, 6),    # 108 KB, 2/SM, 128-160
            (128, 128, 3)),  # 108 KB, 2/SM, 64-128
    True: ((64, 128, 3),     # 108 KB, 2/SM, 64-128
           (64, 64, 4),      # 72 KB, 3/SM, 96-144
           (64, 64, 6),      # 108 KB, 2/SM, 128-160
           (64, 128, 4),     # 144 KB, 1/SM, 64-96
           (128, 64, 3)),    # 102 KB, 2/SM, 64-128
}
# M <= SWAPAB_MAX_M runs the swap-AB kernel (select_config; after the gemv's GEMV_MAX_M, which wins where
# both cover M) and, for plain GEMMs, Triton instead of cuBLAS (prefer_triton). 0 = never: unmeasured.
# After examples/bench_gemm.py --tune shows it ahead of the tiled kernel and cuBLAS at decode rows, this
# one line switches it on (16 at most: the table's tiles are for BLOCK_M = 16).
SWAPAB_MAX_M = 0


def _swapab_split_k(M: int, N: int, K: int, bm: int, bn: int, bk: int, per_sm: int = 4) -> int:
    """K slices (a power of two <= 16) until the grid holds ~`per_sm` programs per SM: with one to four
    programs resident per SM, several waves of shorter programs even out the SMs' shares of the weight
    stream (224 output tiles over 132 SMs would give 92 SMs two programs and 40 SMs one); every slice
    keeps >= 4 K blocks so that its pipeline gets past the prologue (num_stages - 1 <= 5 blocks are
    loaded up front). Partials cost an fp32 write + read of [M, N] per slice: ~0.5 MB at M=1 split 16."""
    return _fill_split_k(M, N, K, bm, bn, bk, per_sm, min_blocks=4)


def _swapab_config(M: int, N: int, K: int, activation: str = "none", dtype: torch.dtype = torch.bfloat16) -> dict:
    """The swap-AB row of the table (used by select_config for M <= SWAPAB_MAX_M; 16-bit dtypes)."""
    bm = max(16, next_power_of_2(max(M, 1)))
    bn, bk, stages = _SWAPAB_TILES[activation == "swiglu"][0]
    return _swapab_cfg(bm, bn, bk, stages, split=_swapab_split_k(M, N, K, bm, bn, bk))


def select_config(M: int, N: int, K: int, activation: str = "none", dtype: torch.dtype = torch.bfloat16) -> dict:
    """The config table, by M bucket (the scenario of kernopt.workload.classify, read off the row count).

    | M (rows) | scenario                  | tile M x N x K, warps, stages (bf16/fp16)        | why                            |
    |----------|---------------------------|--------------------------------------------------|--------------------------------|
    | <= 16    | single-stream/interactive | 16 x 64 x 128, 4 warps, stages to fit 2 programs | weight-bandwidth bound (GEMV): |
    |          |                           | per SM (5 plain, 4 swiglu); split-K up to ~2     | deep pipeline, every SM busy   |
    |          |                           | programs per SM (down proj N=4096: 4 splits)     |                                |
    | 17 - 64  | interactive/server        | 64 x 64 x 128, 4 warps, 4 stages (swiglu 3)      | still bandwidth bound, wgmma   |
    | 65 - 256 | server                    | 64 x 128 x 64 (swiglu 64 x 64), 4 warps, 4 stages| balanced, 2 programs per SM    |
    | > 256    | server/offline            | 128 x 256 x 64, 8 warps, 3 stages, GROUP_M 8;    | tensor-core bound: big wgmma   |
    |          |                           | with any epilogue 128 x 128 x 64, 4 stages       | tiles, grouped order for L2    |

    swiglu keeps two accumulators and loads two weight tiles, hence its narrower N tile and shallower
    decode pipeline; at M > 256 gelu's erf on a 128 x 256 tile spills registers, so every epilogue but
    "none" takes 128 x 128 there. fp32 (IEEE FMA, no tensor cores) uses BLOCK_K 32-64 and at most 128 x 128 tiles.
    Register/shared-memory facts behind the table come from compiling each entry for sm_90 offline
    (no spills; smem <= 192 KB); the speeds are to be confirmed by examples/bench_gemm.py --tune.

    The gemv (``"impl": "gemv"``, the FMA kernel for decode rows, `_GEMV_TILE`) takes over every M <=
    GEMV_MAX_M: 1, measured ahead of (or level with) both the tiled kernel and cuBLAS there on the H200;
    prefer_triton follows it for plain GEMMs. At M = 2..16 candidate_configs offers it to the --tune
    sweep and to KERNOPT_AUTOTUNE. The swap-AB kernel (``"impl": "swapab"``, `_SWAPAB_TILES`) is
    switched the same way by SWAPAB_MAX_M (0: unmeasured); the gemv wins where both constants cover M.
    """
    if M <= GEMV_MAX_M:
        return _gemv_config(M, N, K, activation, dtype)
    if M <= SWAPAB_MAX_M and dtype != torch.float32:
        return _swapab_config(M, N, K, activation, dtype)
    swiglu = activation == "swiglu"
    nw = 2 if swiglu else 1
    if dtype == torch.float32:
        if M <= 16:
            return _cfg(16, 64, 64, 4, _stages(16, 64, 64, nw, 4, _SMEM_TWO_PER_SM), group=1,
                        split=_split_k(M, N, K, 16, 64, 64))
        if M <= 64:
            return _cfg(64, 64, 16, 4, 3)
        return _cfg(128, 64 if swiglu else 128, 32, 8, 3)
    if M <= 16:
        return _cfg(16, 64, 128, 4, _stages(16, 64, 128, nw, 2, _SMEM_TWO_PER_SM), group=1,
                    split=_split_k(M, N, K, 16, 64, 128))
    if M <= 64:
        return _cfg(64, 64, 128, 4, 3 if swiglu else 4)
    if M <= 256:
        return _cfg(64, 64 if swiglu else 128, 64, 4, 4)
    if activation == "none":
        return _cfg(128, 256, 64, 8, 3)
    # Two accumulators (swiglu), or erf/exp epilogues on a 128 x 256 tile, spill registers at 8 warps.
    return _cfg(128, 128, 64, 8, 4)


def candidate_configs(M: int, N: int, K: int, activation: str = "none") -> list[dict]:
    """A short list around the table's choice, for kernopt.workload.autotune (bf16/fp16 sizes).

    Every entry compiles for sm_90 without register spills and within the 227 KB shared-memory limit.
    """
    swiglu = activation == "swiglu"
    nw = 2 if swiglu else 1
    if M <= 16:
        two, big = _SMEM_TWO_PER_SM, 200 * 1024  # two programs per SM, or one deeper-pipelined one
        tiles = ((32, 128, two), (64, 128, two), (64, 128, big), (32, 256, two)) if swiglu else \
                ((32, 128, two), (64, 128, two), (64, 128, big), (64, 256, two), (128, 128, two))
        out = []
        for bn, bk, budget in tiles:
            for split in sorted({1, _split_k(M, N, K, 16, bn, bk)}):
                out.append(_cfg(16, bn, bk, 4, _stages(16, bn, bk, nw, 2, budget), group=1, split=split))
        # The gemv: the table's entry and the alternatives, each unsplit and with the splits that give
        # ~1 (the table's) and ~4 programs per SM (the same choice when the weight rows alone give that many).
        bm = next_power_of_2(max(M, 1))
        # At one row, unsplit 4-warp tiles of <= 64 rows over > 2 K blocks also through the 3-stage loop (LOAD_STAGES:
        # two K blocks in flight during one block's math; split, 8-warp or 128-row staged tiles were slower,
        # sweeps/gemv_stages): the table's pick for one weight (_GEMV_STAGED); SwiGLU untimed.
        for bn, row_bytes, warps in dict.fromkeys((_GEMV_TILE[bm][swiglu],) + _GEMV_CANDIDATES[bm][swiglu]):
            bk = row_bytes // 2
            for split in sorted({1, _gemv_split_k(M, N, K, bm, bn, bk), _gemv_split_k(M, N, K, bm, bn, bk, 4)}):
                out.append(_gemv_cfg(bm, bn, bk, warps, split))
                if M == 1 and split == 1 and bn <= 64 and warps == 4 and cdiv(K, bk) > 2:
                    out.append(_gemv_cfg(bm, bn, bk, warps, split, stages=3))
        # The swap-AB tensor-core kernel: its table row and alternatives, each with the split that gives
        # ~4 programs per SM, the table's row also unsplit and with ~2 per SM.
        for i, (bn, bk, stages) in enumerate(_SWAPAB_TILES[swiglu]):
            splits = {_swapab_split_k(M, N, K, 16, bn, bk)}
            if i == 0:
                splits |= {1, _swapab_split_k(M, N, K, 16, bn, bk, per_sm=2)}
            for split in sorted(splits):
                out.append(_swapab_cfg(16, bn, bk, stages, split))
        # 64 x 128 at both budgets is the same config when the deepest pipeline already fits in two per SM
        return [c for i, c in enumerate(out) if c not in out[:i]]
    if M <= 64:
        if swiglu:
            return [_cfg(64, 64, 128, 4, 3), _cfg(64, 64, 64, 4, 4), _cfg(32, 64, 128, 4, 4),
                    _cfg(64, 128, 64, 4, 3), _cfg(64, 128, 64, 4, 4)]
        out = [_cfg(64, 64, 128, 4, 4), _cfg(32, 64, 128, 4, 4), _cfg(64, 128, 64, 4, 4),
               _cfg(64, 128, 128, 4, 3), _cfg(64, 256, 64, 4, 3)]
        if activation != "none":  # erf/exp epilogues spill above 64 fp32 outputs per thread
            out = [c for c in out if c["BLOCK_M"] * c["BLOCK_N"] <= 64 * 32 * c["num_warps"]]
        return out
    if M <= 256:
        if swiglu:
            return [_cfg(64, 64, 64, 4, 4), _cfg(64, 64, 128, 4, 3), _cfg(128, 64, 64, 4, 4),
                    _cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 4)]
        out = [_cfg(64, 128, 64, 4, 4), _cfg(64, 64, 64, 4, 4), _cfg(128, 64, 64, 4, 4),
               _cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 4, 4), _cfg(64, 256, 64, 4, 3)]
        if activation != "none":  # erf/exp epilogues spill above 64 fp32 outputs per thread
            out = [c for c in out if c["BLOCK_M"] * c["BLOCK_N"] <= 64 * 32 * c["num_warps"]]
        return out
    if swiglu:  # two accumulators: 128 x 256 (or 128 x 128 on 4 warps) spills
        return [_cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4),
                _cfg(64, 128, 64, 4, 4), _cfg(128, 128, 32, 8, 5)]
    if activation != "none":  # an erf/exp epilogue on more than 128 x 128 outputs per 8 warps spills
        return [_cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4),
                _cfg(64, 128, 64, 4, 4), _cfg(128, 128, 32, 8, 5)]
    return [_cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(256, 128, 64, 8, 3),
            _cfg(128, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4), _cfg(64, 256, 64, 4, 3)]


def format_config(cfg: dict) -> str:
    """One line for explain() and benchmark rows."""
    return (f"impl={cfg.get('impl', 'tiled')} BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} BLOCK_K={cfg['BLOCK_K']} "
            f"GROUP_M={cfg.get('GROUP_M', 1)} SPLIT_K={cfg.get('SPLIT_K', 1)} "
            f"warps={cfg['num_warps']} stages={cfg['num_stages']}")


# --------------------------------------------------------------------------------------------------
# Crossover: where the Triton kernel is expected to beat cuBLAS (+ Inductor's fused epilogue)
# --------------------------------------------------------------------------------------------------
# The pass rewrites a linear (+ activation) only when prefer_triton() returns None; otherwise it keeps
# aten.mm/addmm (cuBLAS; addmm fuses the bias) and lets Inductor fuse the activation into one pointwise
# kernel. The baseline costs one extra read+write of the [M, N] output per unfused op (for swiglu:
# gate and up written, read back, product written) and one launch per op.
#
# | activation         | M range      | pick    | basis                                                      |
# |--------------------|--------------|---------|------------------------------------------------------------|
# | swiglu             | <= 16        | Triton  | measured H100: 95.4 vs 101.4 us (M=1), 95.5 vs 102.0 (M=16) at K=4096 N=14336 |
# | swiglu             | > 16         | cuBLAS  | measured H100: 157.7 vs 119.0 us (M=256), 1468 vs 1369 (M=4096) |
# | silu/gelu/gelu_tanh| <= 16        | Triton  | same kernel and epilogue cost as swiglu's, half the weights (not measured separately) |
# | silu/gelu/gelu_tanh| > 16         | cuBLAS  | as swiglu above                                            |
# | none (+bias)       | any          | cuBLAS  | measured H100: 0.24-0.92x of cuBLAS at every M for qkv/down shapes |
# |                    |              |         | (tiled kernel); M <= GEMV_MAX_M / SWAPAB_MAX_M (now 0) would |
# |                    |              |         | go to the gemv / the swap-AB kernel                        |
# | any, fp32 input    | any          | cuBLAS  | our fp32 path is IEEE (exact), cuBLAS' SGEMM is faster     |
#
# Measured with examples/bench_gemm.py on an H100 (benchmarks/results/gemm-h100.json). The gemv and the
# swap-AB kernel were not part of that run: plain GEMMs follow max(GEMV_MAX_M, SWAPAB_MAX_M) (read per
# call), so switching either on for decode rows also sends plain decode GEMMs to it (give "none" its own
# entry here if it turns out to beat the tiled kernel but not cuBLAS on them).
_TRITON_MAX_M = {"swiglu": 16, "silu": 16, "gelu": 16, "gelu_tanh": 16}


def prefer_triton(M: int, N: int, K: int, activation: str = "none", dtype: torch.dtype = torch.bfloat16
                  ) -> Optional[str]:
    """None when the Triton kernel is expected to be faster here, else why cuBLAS (+Inductor) is kept."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(map(repr, ACTIVATIONS))}")
    if dtype == torch.float32:
        return "fp32 input: cuBLAS SGEMM is faster than the IEEE-fp32 Triton path"
    limit = _TRITON_MAX_M.get(activation, max(GEMV_MAX_M, SWAPAB_MAX_M))
    if activation == "none" and M > limit:
        return (f"M={M} K={K} N={N} plain GEMM: nothing to fuse; cuBLAS measured faster than the tiled "
                f"kernel at every M (gemm-h100.json)" + (f", the gemv / swap-AB kernel runs M <= {limit}" if limit else ""))
    if M > limit:
        return (f"M={M} K={K} N={N} {activation}: above M={limit} cuBLAS + Inductor's epilogue measured "
                f"faster (gemm-h100.json)")
    return None


# --------------------------------------------------------------------------------------------------
# Launcher and reference
# --------------------------------------------------------------------------------------------------
def _check_config(config: dict) -> dict:
    missing = [k for k in CONFIG_KEYS if k not in config and k not in ("impl", "GROUP_M", "SPLIT_K")]
    unknown = [k for k in config if k not in CONFIG_KEYS]
    if missing or unknown:
        raise ValueError(f"gemm config {config}: missing {missing}, unknown {unknown}; keys are {CONFIG_KEYS}")
    cfg = {"impl": "tiled", "GROUP_M": 1, "SPLIT_K": 1, **config}
    if cfg["impl"] not in IMPLS:
        raise ValueError(f"gemm config impl={cfg['impl']!r}: valid: {', '.join(map(repr, IMPLS))}")
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = cfg[k]
        if cfg["impl"] == "gemv" and k != "BLOCK_K":  # FMA tiles: any power of two
            if v < 1 or v & (v - 1):
                raise ValueError(f"gemm config {k}={v}: must be a power of two (gemv)")
        elif v < 16 or v & (v - 1):
            raise ValueError(f"gemm config {k}={v}: must be a power of two >= 16 "
                             + ("(gemv: 16-byte vectors along K)" if cfg["impl"] == "gemv" else "(tl.dot's minimum)"))
    if cfg["GROUP_M"] < 1 or cfg["SPLIT_K"] < 1:
        raise ValueError(f"gemm config: GROUP_M and SPLIT_K must be >= 1, got {cfg}")
    return cfg


def _single_pass(x, w, wu, bias, out, cfg, act: int, scales=None) -> torch.Tensor:
    """Launch the gemv or swapab kernel: one program per output tile and K slice, single-pass split-K.
    `scales` ((sa, stride_sa), (sb, stride_sb)): the SCALED epilogue of either kernel (kernels/fp8_gemm.py, e4m3
    x and w)."""
    M, K = x.shape
    N = w.shape[0]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    # Whole K blocks per slice, and no empty slice: SPLIT_K above the number of K blocks is clamped.
    k_per_split = cdiv(cdiv(max(K, 1), cfg["SPLIT_K"]), bk) * bk
    split = cdiv(max(K, 1), k_per_split)
    tiles = cdiv(M, bm) * cdiv(N, bn)
    if split > 1:
        part = torch.empty((2 if act == _ACT_CODE["swiglu"] else 1, split, M, N), dtype=torch.float32,
                           device=x.device)
        # one int32 per output tile, zero between calls: kernels/workspace.py (one buffer per device,
        # reserved outside CUDA-graph pools, shared by every single-pass kernel)
        pg, pu, counters = part[0], part[-1], arrival_counters(x.device, tiles)
    else:
        pg = pu = counters = out  # never touched with SPLIT_K=1
    b = bias if bias is not None else out  # never read when HAS_BIAS is False
    args = (x, w, wu, b, out, pg, pu, counters, M, N, K, k_per_split,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), wu.stride(0), wu.stride(1),
            out.stride(0), out.stride(1), M * N)
    common = dict(ACT=act, HAS_BIAS=bias is not None, EVEN_K=K % bk == 0, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_K=bk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    extra = {}
    if scales is not None:
        (sa, stride_sa), (sb, stride_sb) = scales
        extra = dict(sa_ptr=sa, sb_ptr=sb, stride_sa=stride_sa, stride_sb=stride_sb, SCALED=True)
    if cfg["impl"] == "gemv":  # num_stages > 1: the pipelined K loop, bf16 and fp8 (kernels/fp8_gemm.py)
        extra["LOAD_STAGES"] = cfg["num_stages"]
        pdl = use_pdl(x)
        _gemv_kernel[(tiles, split)](*args, VEC=min(bk, 16 // x.element_size()), PDL=pdl, **common,
                                     **extra, **launch_kwargs(pdl))
    else:
        _gemm_swapab_kernel[(tiles, split)](*args, IEEE=x.dtype == torch.float32, **common, **extra)
    return out


def _check_inputs(x, w, bias, w_up, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(map(repr, ACTIVATIONS))}")
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"gemm expects x [M, K] and w [N, K]; got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"gemm: x dtype {x.dtype} not supported; valid: {', '.join(map(str, DTYPES))}")
    if w.dtype != x.dtype:
        raise ValueError(f"gemm: w dtype {w.dtype} differs from x dtype {x.dtype}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"gemm: K mismatch, x {tuple(x.shape)} vs w {tuple(w.shape)} (w is [N, K])")
    if w.device != x.device:
        raise ValueError(f"gemm: x on {x.device}, w on {w.device}")
    N = w.shape[0]
    if activation == "swiglu":
        if w_up is None:
            raise ValueError("gemm: activation='swiglu' needs w_up [N, K] (silu(x @ w.T) * (x @ w_up.T))")
        if w_up.shape != w.shape or w_up.dtype != w.dtype or w_up.device != w.device:
            raise ValueError(f"gemm: w_up {tuple(w_up.shape)} {w_up.dtype} {w_up.device} must match "
                             f"w {tuple(w.shape)} {w.dtype} {w.device}")
        if bias is not None:
            raise ValueError("gemm: bias with activation='swiglu' is ambiguous (gate or up?); not supported")
    elif w_up is not None:
        raise ValueError(f"gemm: w_up is only used with activation='swiglu', got activation={activation!r}")
    if bias is not None:
        if bias.shape != (N,) or bias.device != x.device or not bias.dtype.is_floating_point:
            raise ValueError(f"gemm: bias must be a float [N]={N} tensor on {x.device}, got "
                             f"{tuple(bias.shape)} {bias.dtype} {bias.device}")


def gemm(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None, w_up: Optional[torch.Tensor] = None,
         activation: str = "none", config: Optional[dict] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = act(x @ w.T + bias) (or silu(x @ w.T) * (x @ w_up.T) for "swiglu") in one kernel, fp32 accumulation."""
    _check_inputs(x, w, bias, w_up, activation)
    M, K = x.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    elif out.shape != (M, N) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"gemm: out must be [{M}, {N}] {x.dtype} on {x.device}, got "
                         f"{tuple(out.shape)} {out.dtype} {out.device}")
    if M == 0 or N == 0:
        return out
    cfg = _check_config(config if config is not None else select_config(M, N, K, activation, x.dtype))
    if cfg["impl"] in ("gemv", "swapab"):
        return _single_pass(x, w, w_up if activation == "swiglu" else w, bias, out, cfg, _ACT_CODE[activation])
    bm, bn, bk, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    # Each split covers a whole number of K tiles; trailing splits may be empty (they write zeros).
    k_per_split = cdiv(cdiv(max(K, 1), split), bk) * bk if split > 1 else K
    even_k = K % bk == 0 and (split == 1 or k_per_split * split == K)
    act = _ACT_CODE[activation]
    swiglu = activation == "swiglu"
    wu = w_up if swiglu else w
    part = (torch.empty((2 if swiglu else 1, split, M, N), dtype=torch.float32, device=x.device)
            if split > 1 else out)
    b = bias if bias is not None else out  # never read when HAS_BIAS is False
    grid = (cdiv(M, bm) * cdiv(N, bn), split)
    _gemm_kernel[grid](
        x, w, wu, b, out, part, M, N, K, k_per_split,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), wu.stride(0), wu.stride(1),
        out.stride(0), out.stride(1),
        ACT=act, HAS_BIAS=bias is not None, EVEN_K=even_k, IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], SPLIT_K=split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split > 1:
        rbn = min(1024, next_power_of_2(N))
        _split_k_reduce_kernel[(M, cdiv(N, rbn))](
            part, b, out, M, N, out.stride(0), out.stride(1),
            ACT=act, HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_N=rbn, num_warps=4,
        )
    return out


def gemm_ref(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
             w_up: Optional[torch.Tensor] = None, activation: str = "none") -> torch.Tensor:
    """Plain torch, in the input dtype: what eager runs and the pattern the pass recognises."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(map(repr, ACTIVATIONS))}")
    y = F.linear(x, w, bias)
    if activation == "none":
        return y
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if w_up is None:
        raise ValueError("gemm_ref: activation='swiglu' needs w_up [N, K]")
    return F.silu(y) * F.linear(x, w_up)
