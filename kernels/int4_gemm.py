"""INT4 weight-only GEMM: y = x @ dequant(qweight, scales, zeros).T (+ bias), dequantizing in registers.

Weight format (kernopt's; `kernopt/int4.py` builds it and converts GPTQ/AWQ tensors into it):

- ``qweight`` int32, logical shape [N, K // 8]: word ``qweight[n, j]`` holds k = 8*j .. 8*j+7, nibble i
  (bits 4i..4i+3) is k = 8*j + i, an unsigned 4-bit code q in [0, 15].
- ``scales`` [N, K // group_size] fp16/bf16/fp32; ``zeros`` [N, K // group_size] (any dtype) or None for
  symmetric weights (zero = 8); ``w[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]``;
  group_size a power of two >= 16 dividing K (32, 64, 128 in practice).
- Any strides are accepted. The storage kernopt writes is **N-contiguous** (each tensor is the ``.t()``
  of a row-major [K/8, N] / [K/g, N] tensor): that is GPTQ's own storage, so GPTQ checkpoints need no copy,
  and a uint8 [N, K/2] low-nibble-first tensor is the same words through ``u8.view(torch.int32)``.

Why N-contiguous: both kernels load a [BLOCK_K/8, BLOCK_N] word tile whose rows are contiguous runs of
BLOCK_N words (fully coalesced, 16-byte vectors), unpack it in registers to [BLOCK_K/8, 8, BLOCK_N]
= [BLOCK_K, BLOCK_N], which is already tl.dot's B operand (no transpose), and the per-group scales
and zeros for a block are one contiguous run of BLOCK_N values. Measured on the H100 at M=1,
K=4096, N=14336: this load pattern ran 2.2x faster than K-contiguous words (30 vs 66 us).

Algorithms (chosen per shape by `select_config`, the one table of this family):

- ``gemv`` (decode, smallest M): FMA kernel. Each program owns BLOCK_N outputs and one K slice (split-K);
  nibbles become floats with the 2^23 trick (``(q | 0x4B000000)`` bitcast to fp32 is 2^23 + q, one
  subtraction away from q: no int->float conversion), zero and scale are applied once per group to
  the partial dot products, and split-K partials are summed by a small second kernel.
- ``tiled`` (larger M): tensor-core kernel. The word tile is unpacked, zero-shifted and scaled in fp32,
  cast to x's dtype and fed to ``tl.dot`` with fp32 accumulation; optional split-K for small M.
- ``dequant_cublas`` (large M): a Triton kernel dequantizes the whole weight to x's dtype, then
  ``F.linear`` (cuBLAS), which wins once the GEMM is compute-bound and the dequant is amortised.
- ``wgr`` (M = 2..64; 16-bit x, groups >= 32; kernels/int4_wgmma.py, Gluon): swap-AB wgmma
  with the words TMA'd into a ring and unpacked two nibbles per LOP3 straight into the register operand; the table's
  pick there since 97e4eb1 (1.58-1.88x bf16 cuBLAS on the H200 at the two large suite shapes at b83eb2e, where
  tiled2 was at ~1x), offered by int4_gemm only where it runs (`_table_wgr`).
- ``ldmma`` (M <= 8, K = 4096, N = 4096..16384, and K14336 N4096 split 4 ways; bf16 x, group 128; kernels/
  int4_ldmma.py, Gluon): swap-AB mma.sync with the words loaded by 16-byte global loads straight into the A
  fragment, a program per 32 columns over all of K (at K14336 N4096 four per 32 columns, each a K slice, the last
  to arrive summing their fp32 slots); the table's pick there since 06413f7 (`_ldmma_pick`: 5-25 % faster than
  PAIRS / wgr in the same call), offered only where it runs (`_table_ldmma`) and not for a gated one-row launch.

Variants (selectable with ``config={"impl": ...}``, swept by `candidate_configs` for M <= 16; all use the
same storage). Since the H200 sweep of 2026-11-29 `select_config` picks ``gemv2`` at M=1 and ``tiled2`` at
M=2..16 where ``wgr`` does not run (16-bit x, groups >= 32, a CUDA launch: `_table_wgr`; wgr is the pick elsewhere
at M = 2..64); ``tiled3`` stays a candidate (25.2 us at M=1 K=4096 N=14336 against gemv2's 22.2: its ~8 us of
issue time, below, is not what bounds it).

- ``gemv2``: the GEMV with (1) a cheaper unpack: each nibble is moved to bit 12 or 16 (4 shifts per
  word) and OR-ed under an fp32 exponent, so the word reads B + q (B = 2^11 or 2^7) after a single
  3-input LOP3 (the exponents are kept in registers through a runtime zero, else ptxas splits the
  and/or into two ops); the bias is not subtracted per nibble but once per word row (sum_j x_j B_j),
  which is exact enough because B is small (fp32 error ~2^-10 |x| per word row). (2) zero and scale
  applied per word row into a [BLOCK_K/8, BLOCK_N] accumulator, reduced across threads once at the
  end instead of every K block. (3) ``PREFETCH``: the next K block's words and group params are
  loaded into registers before the current block is unpacked (a register double buffer: the gemv
  runs at num_stages=1, so nothing else overlaps its loads with its math). (4) single-pass split-K
  (below). Why: sm_90 SASS of the M=1 K=4096 N=14336 config (ptxas 12.x from triton 3.6, compiled
  offline) has 1595 instructions in the gemv loop body for 256 nibbles per thread (6.2 per nibble:
  SHF + SGXT + LOP3 + FADD + FFMA each, plus x conversions and shared-memory shuffles) against 1190
  for gemv2 (4.6 per nibble, one LOP3 + one FFMA each). At 1 warp-instruction per cycle per
  scheduler that is ~12 us -> ~9 us of issue time for 29 MB, under the 30 us measured but the part
  that cannot overlap with loads at this occupancy (gemv2 uses ~240 registers: 2 CTAs of 4 warps
  per SM). Expected: 30 -> ~15-20 us at M=1 if issue + exposed latency is the bound; if gemv2 is not
  faster, the bound is memory-level parallelism and the next step is more bytes in flight per SM.
- ``gemv2`` ``PAIRS`` (the table's M=1 pick for bf16 x since 471c8f1, any zero points): packed bf16x2 math, two
  nibbles per instruction (int4_tgemv.word_pairs_ptx). prmt puts byte m of a word and byte m of (word >> 4) in the
  two halves of a register, one LOP3 makes them the bf16 pair (128 + q_2m, 128 + q_2m+1), one HFMA2 centres it to q - 8
  (exact), and four HFMA2 sum x (q - 8) over the word's 8 nibbles against x's own adjacent pairs, read as int32
  (no x conversion, no relayout); the two bf16 lanes (4 products each) go to fp32 and are added; zero and scale
  per word row in fp32 as gemv2 does (zero points: + (8 - z) times the row's x sum). Offline sm_90a
  (benchmarks/sass_loop.py --symmetric, 128 x 128 x 4 warps): 413 instructions per 128 nibbles (3.2 / nibble,
  80 registers; 430 at a14fa7a, the timed version, before x's loads lost their masks within K and the signed
  halving of their index) against 684 (5.3, 125 registers) for the fp32 path with bf16 x. Accuracy: bf16 rounding of each
  product and partial sum, an error proportional to the outputs' RMS (~0.6% of it on the GPU test at |x| ~ 1e4,
  inside bf16's tolerance; fp16 x would overflow past |x| ~ 2000, so fp16 and float32 x keep the fp32 path).
  H200 (sweeps/pairs/gemm_int4_sym-h200.json, a14fa7a, symmetric, --tune): 14.4 / 13.8 / 7.6 us at the best tiles
  against 21.2 / 20.4 / 9.8 for the fp32 path and 30.9 / 32.3 / 13.3 for bf16 cuBLAS (2.1-2.3x at the two large
  shapes); the suite's asymmetric weights with the table's pick (gemm_int4-h200.json, 471c8f1) 16.9 / 15.9 /
  8.4 us, 1.83 / 1.99 / 1.60x cuBLAS. End to end (llama 8B bs1, sweeps/pairs/llama-h200.json) the int4 decode step
  went 3.66 -> 2.73 ms in one run. Tiles since 936f0f6: 32 columns x 2 warps split 16 up to N = 4096; above, 64
  columns split so that the grid fits one wave of resident programs (_fill_split: 10 per SM at 2 warps / 96 registers,
  4 warps from N = 16384), which gemm_int4-h200.json (936f0f6) puts at 15.72 us at K4096 N14336 (1.97x bf16 cuBLAS).
- ``gemv2`` ``PAIRS`` with ``BLOCK_M`` 2 or 4 (multi-row PAIRS; --tune candidates at M 2-16; the table's pick at
  M=2 with bf16 x, 1.31-1.44x bf16 cuBLAS on the H200, where tiled2 was at ~1x; level with tiled2 at M=4): the
  word tile is unpacked into its four bf16x2 (q - 8) pair tiles once (_UNPACK_PAIRS_PTX), then each x row runs
  the one-row loop's 4 HFMA2 and lane sum (_PAIRS_DOT_PTX), zero and scale into its own [BLOCK_K/8, BLOCK_N]
  accumulator, in the one-row layout (no shared memory). Offline sm_90a (sass_loop, K4096
  N14336 symmetric): 4.7-4.8 instructions per nibble for 2 rows and 7.3-7.4 for 4 (against 3.2 for one row), 96-128
  registers at 32 columns, no spills. A first version with one [BLOCK_M, BLOCK_K/8, BLOCK_N] accumulator compiled to
  shared-memory relayouts of x every K block (40 BAR, 64 LDS per loop at 4 rows; 6.95 per nibble at 2 rows).
- ``tiled2``: the tensor-core kernel with the same LOP3 unpack, ``(B + q) - (B + z)`` (exact: B <= 2^11
  and z a 16-bit float) times s in fp32, one rounding to x's dtype (the reference's value), and the
  single-pass split-K. The tiled loop's SASS (BLOCK 16x128x64, bf16) drops the 64 I2FP and ~100
  SHF/SGXT per 64 nibbles: 524 -> 467 instructions per K block. Its remaining overhead is one 16-bit
  STS per dequantized element into the dot's shared-memory operand (64 per 64 nibbles), which neither
  kernel avoids; expected gain at M=4/16 is therefore modest (38-41 us -> ~33-36 us).
- ``tiled3`` (swap-AB tensor-core kernel, M <= 16): out^T [BLOCK_N, 16] = W @ x^T as 8 dots per K block,
  one per nibble plane j: (B + q_j) [BLOCK_N, BLOCK_K/8] @ x_j^T [BLOCK_K/8, 16], x_j = x[:, k0 + 8r + j]. The
  weight is wgmma's first operand, which sm_90 reads from registers: the words are cp.async'd (num_stages)
  and read from shared memory straight into the dot-operand layout, then 0x4300 | q (bf16; 0x6400 | q in
  fp16) is B + q exactly (B = 128 / 1024), two nibbles (j, j + 4) per 32-bit LOP3, and no dequantized
  element is stored to shared memory. Zero and scale are per output row here, so they are applied to
  each block's fp32 dot: s (dot - (B + z) sum_k x), more exact than the reference's bf16 weight. x's
  planes (stride-8 gathers that cp.async cannot copy) are prefetched into registers one block ahead.
  BLOCK_K = 128 (the dots need K >= 16): group sizes >= 128 only. Single-pass split-K as below.
  candidate_configs sweeps it at M <= 16; select_config does not pick it (measured slower, above).
- ``tcasm`` (swap-AB tensor-core kernel, M <= 16; a candidate, never picked by select_config; the
  KERNOPT_INT4_GEMV=tcasm experiment below): out^T [BLOCK_N, 16] = W @ x^T with W [BLOCK_N, BLOCK_K] as wgmma's register operand, like
  tiled3, but one dot per group over all of its K (not 8 plane dots of K/8), and two nibbles per 32-bit
  instruction: inline PTX ``lop3.b32 (w >> 4m) & 0x000F000F | 0x43004300`` gives nibbles m and m + 4 of a word
  as a bf16x2 pair (128 + q each; 0x64006400 in fp16), 7 instructions per word. The dot's K order is permuted
  within each 32-column chunk so that such a pair is exactly a pair of adjacent k of the fragment register and
  a whole word goes to one lane (word 4c + t of a chunk -> lane t % 4, its 8 values = that lane's 8 fragment
  elements of two k16 steps): no PRMT / shuffle between the unpack and the wgmma. x is gathered in the same
  order (the sum over k does not care); zero and scale on each group's fp32 dot, s (dot - (B + z) sum_k x).
  The dot's rows are permuted too (`_tcasm_rows`): a lane's fragment rows are consecutive n, so the words are
  cp.async'd as 16-byte vectors (4-byte copies otherwise: 16 LDGSTS per 128 nibbles instead of 4).
  Interpreter: the same kernel with a plain-Triton unpack of identical values (ASM=False). A storage repack
  would save nothing here: the permutation costs only x's gather addresses. Offline sm_90a (K4096 N14336
  g128, bf16 x, benchmarks/sass_loop.py), instructions of the K loop per 128 nibbles per thread: 128 x 128 x 4
  warps 322 (2.52 / nibble, 163 registers: LOP3 67, SHF 49, IMAD 41, FFMA 32, HGMMA 16, LDGSTS 4), 256 x 128
  x 8 warps 337 (198 registers), BLOCK_K 256 (two groups) 306 per 128; at M = 16 397 (x gathers); against
  tiled3's 499 and gemv2's 697 (520 with fp32 x). Per group it pays the x gather, the sum of x (shuffles +
  barrier) and 2 FFMA per accumulator element ([BLOCK_N, 16]: 15 padding columns at M = 1), so g32 costs
  5.5 / nibble and BLOCK_N 64 4.2. float32 x is refused (16-bit dot operands; an exact 3-way bf16 split of x,
  hi + mid + lo, with weights q - 8 instead of 128 + q to keep fp32 accumulation error small, is the way to
  add it). Measured on the H200 (56ca545, sweeps/gemm_int4-tcasm-h200.json): right, but slower than gemv2
  everywhere (M=1 29.0 / 26.8 / 11.3 us against 22.4 / 21.5 / 10.1); the compiled loop relays the loaded words
  out through shared memory (the row permutation), loads x^T unpipelined and sums it across threads, with
  barriers and a wgmma wait every group: the instruction count was not the limit. DIRECT (1 and 2) loads the
  words in the dot's row order, one group per iteration, next x^T / scales prefetched, and for symmetric
  weights drops the column sum (1: a second dot with a constant operand; 2: the unpack gives q - 8 by one
  packed FMA per pair): 19.0 / 18.2 / 8.6 us with symmetric weights (2), against gemv2's 21.2 / 20.4 / 9.7
  with bf16 x and PLANES' 17.6 / 17.2 / 8.2 (sweeps/gemm_int4_sym-h200.json).

Offline sm_90a compile analysis (2026-11-28, triton 3.6 + its ptxas, CPU only: NOT timings). K4096 N14336
g128 unless noted; instr/nib = SASS instructions of the K loop per weight nibble per thread (issue cost:
the SMs issue ~128 per cycle, so at ~1.75 GHz the H200's 2.3 TB/s target (4.6e12 nibbles/s) allows ~6.4 at
100 % issue); CTAs/SM from registers and shared memory; async = word loads are cp.async (pipelined by
num_stages); in flight = CTAs/SM x word bytes issued ahead of their use (Little's law wants ~20-25 KB/SM).

  impl (config)                          regs CTAs/SM instr/nib async in flight/SM  notes
  gemv M1 (select: 256x128 w4 split16)    119    4      6.2     no   <=64 KB (sync)  2 K blocks per CTA
  gemv M1 K14336/4096^2 (128 w4)           72    7      7.1     no   <=56 KB (sync)
  gemv2 M1 256 w8 split16 PREFETCH         158    1      8.3     no     16 KB          regs: 1 CTA/SM
  gemv2 M1 256 w4 split16 PREFETCH         246    2      4.5     no     32 KB
  gemv2 M4 64 w4 split8                    218    2     30.4     no      8 KB          7.6 per nibble-row
  tiled M4/16 (select: 16x128x64 w4 s3)     80    6      8.3     yes    48 KB          mma.sync, 1 STS/nibble
  tiled M4/16 K14336 (16x128x128 w4 s3)   128    4      7.6     yes    64 KB
  tiled2 M4/16 16x128x64 w4 s3 split4      80    6      7.1     yes    48 KB          mma.sync, 1 STS/nibble
  tiled3 M1 128x128 w4 s3 split4          166    3      3.8     yes    48 KB          wgmma, A in registers
  tiled3 M16 128x128 w4 s3 split4         158    3      4.3     yes    48 KB
  tiled3 M16 64x128 w4 s3                 127    4      6.0     yes    32 KB
  tiled3 M16 128x128 w4 s4                158    3      4.3     yes    72 KB
  tiled3 M16 256x128 w8 s3                169    1      3.8     yes    32 KB          regs: 1 CTA/SM

The numbers are the same at the three (K, N) shapes for a given config (the loop does not depend on K, N);
only the grid changes. None of the FMA kernels' word loads were pipelined: Triton 3.6 pipelines a loop
without a dot only when it is a `tl.range(..., num_stages=n)`, never a plain `range` whatever the kernel's
num_stages (offline, 2026-11-29). gemv2's loop is now a tl.range with the config's num_stages (LOAD_STAGES):
at 2-4 stages its words, scales and x go through shared memory by cp.async (candidates; unmeasured). Read with the measured 30 us at M=1: gemv's 6.2 instr/nibble alone
is ~12 us of issue at 100 %; tiled3 at 3.8-4.3 is ~8 us, under the H200's 12.8 us target for 29.4 MB. A
plane-at-a-time FMA GEMV (static_range(8) over nibble positions, stride-8 x loads, [M, BLOCK_K/8, BLOCK_N]
FFMA accumulators) was compiled and dropped: 11 instr/nibble at 64 x 128 x 4 warps (scalar x gathers and
their address arithmetic), 255 registers with spills at BLOCK_N >= 128, loads not pipelined.
- Single-pass split-K (both): every K slice stores its fp32 partial and bumps an int32 arrival counter
  of its output tile (`tl.atomic_add`, acq_rel); the last slice to arrive sums the partials in slice
  order (deterministic), adds the bias and writes ``out``, then re-arms the counter to 0. That drops
  the second (reduce) kernel and its launch: ~2-3 us of a 30 us call at M=1. The counters live in a
  zeroed buffer per device (kernels/workspace.py), never freed (CUDA graphs may hold it); a kernel killed between
  the atomic and the re-arm would leave a counter set, which later calls on that stream would misread.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .host import cdiv, env_switch, interpreting, next_power_of_2
from .int4_ldmma import int4_ldmma, ldmma_supported
from .int4_tgemv import int4_tgemv, strip_warps, tgemv_geometry, tgemv_supported, word_pairs_ptx
from .int4_wgmma import int4_wgr_gemm, tma_rows_ok, wgr_supported
from .pdl import launch_kwargs, use_pdl
from .tile_order import tile_coords
from .workspace import arrival_counters, split_k_gather


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _load_group_params(s_ptr, z_ptr, offs_n, mask_n, g, stride_sn, stride_sg, stride_zn, stride_zg,
                       HAS_ZEROS: tl.constexpr):
    s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0).to(tl.float32)
    else:
        z = tl.full(s.shape, 8.0, tl.float32)
    return s, z


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_os, stride_om, stride_on,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_j = tl.arange(0, 8)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    # BLOCK_K divides GROUP and GROUP divides K, so a K block never straddles a group or the end of K.
    for k0 in range(k_lo, k_hi, BLOCK_K):
        # words [BLOCK_K/8, BLOCK_N]: with N-contiguous storage each row is one coalesced run
        w = tl.load(qw_ptr + offs_n[None, :] * stride_qn + (k0 // 8 + offs_w)[:, None] * stride_qk,
                    mask=mask_n[None, :], other=0)
        s, z = _load_group_params(s_ptr, z_ptr, offs_n, mask_n, k0 // GROUP, stride_sn, stride_sg,
                                  stride_zn, stride_zg, HAS_ZEROS)
        q = ((w[:, None, :] >> (offs_j * 4)[None, :, None]) & 0xF) | 0x4B000000
        q = q.to(tl.float32, bitcast=True) - 8388608.0  # [BLOCK_K/8, 8, BLOCK_N]: k = 8 * word + nibble
        for i in tl.static_range(BLOCK_M):
            row = pid_m * BLOCK_M + i
            x = tl.load(x_ptr + row * stride_xm + (k0 + offs_w[:, None] * 8 + offs_j[None, :]) * stride_xk,
                        mask=(offs_w[:, None] >= 0) & (row < M), other=0.0).to(tl.float32)
            # sum_k x (q - z) = sum_k x q - z sum_k x: the zero (any float) is applied once per group.
            part = tl.sum(tl.sum(q * x[:, :, None], axis=1), axis=0) - tl.sum(tl.sum(x, axis=1), axis=0) * z
            acc = tl.where((offs_m == row)[:, None], acc + (part * s)[None, :], acc)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _int4_tiled_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_os, stride_om, stride_on,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=mask_m[:, None], other=0.0)
        w = tl.load(qw_ptr + offs_n[None, :] * stride_qn + (k0 // 8 + offs_w)[:, None] * stride_qk,
                    mask=mask_n[None, :], other=0)
        s, z = _load_group_params(s_ptr, z_ptr, offs_n, mask_n, k0 // GROUP, stride_sn, stride_sg,
                                  stride_zn, stride_zg, HAS_ZEROS)
        q = tl.reshape((w[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
        # Rounded once to x's dtype, like the reference's dequantized weight.
        wd = ((q.to(tl.float32) - z[None, :]) * s[None, :]).to(a.dtype)
        acc = tl.dot(a, wd, acc, input_precision=DOT_PRECISION)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _unpack_nibbles_biased(w, zero):
    """[R, C] int32 words -> ([R, 8, C] fp32 values B_j + q, [8] fp32 biases B_j), exact, one LOP3 per nibble.

    Each nibble is moved (4 shifts per word: by 12, 4, -8, -16 bits) to bit 12 or 16 of a word and OR-ed
    under the exponent of B = 2^11 or 2^7, so the bits read B + q as an fp32. `zero` is a runtime 0
    added to the exponent constants: it keeps them in registers, so ptxas emits one 3-input LOP3
    ``(src & mask) | expo`` per nibble instead of an AND and an OR with two immediates.
    """
    j = tl.arange(0, 8)
    pos = 12 + 4 * ((j == 1) | (j == 4) | (j == 6)).to(tl.int32)  # where nibble j lands
    lsh = pos - 4 * j  # its shift: + left, - right (the sign fill lands above bit 19, masked off)
    expo = ((150 - pos) << 23) + zero  # fp32 bits of B = 2^(23 - pos): the nibble counts in units of 1
    w3 = w[:, None, :]
    src = tl.where(lsh[None, :, None] >= 0, w3 << tl.maximum(lsh, 0)[None, :, None],
                   w3 >> tl.maximum(-lsh, 0)[None, :, None])
    bits = (src & (0xF << pos)[None, :, None]) | expo[None, :, None]
    return bits.to(tl.float32, bitcast=True), (expo - zero).to(tl.float32, bitcast=True)


@triton.jit
def _nibble_plane(w, j: tl.constexpr, zero):
    """Nibble j of every word of w as the fp32 value B_j + q, exactly (B_j = 2^11 or 2^7), and B_j: the nibble is
    shifted to bit 12 or 16 (no shift for j = 3, 4) and OR-ed under B_j's exponent, one LOP3 (see
    _unpack_nibbles_biased, which does all 8 planes at once on a [R, 8, C] tensor)."""
    pos: tl.constexpr = 16 if (j == 1 or j == 4 or j == 6) else 12
    lsh: tl.constexpr = pos - 4 * j
    if lsh > 0:
        src = w << lsh
    elif lsh < 0:
        src = w >> (-lsh)  # arithmetic: the sign fill lands above bit 19, masked off
    else:
        src = w
    expo: tl.constexpr = (150 - pos) << 23
    bits = (src & (0xF << pos)) | (expo + zero)
    return bits.to(tl.float32, bitcast=True), 2.0 ** (23 - pos)


@triton.jit
def _store_tile(acc, out_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on,
                HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _finish_tile(acc, out_ptr, part_ptr, cnt_ptr, b_ptr, tile, pid_k, offs_m, offs_n, M, N,
                 stride_om, stride_on, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Single-pass split-K: every K slice stores its fp32 partial to the [SPLIT_K, M, N] workspace and
    bumps the tile's arrival counter; the slice that arrives last sums the partials in slice order
    (deterministic, whichever slice is last), adds the bias, writes `out` and re-arms the counter to 0."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    if SPLIT_K == 1:
        _store_tile(acc, out_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, HAS_BIAS)
    else:
        mask = mask_m[:, None] & mask_n[None, :]
        offs = offs_m[:, None] * N + offs_n[None, :]
        last, total, _ = split_k_gather(acc, acc, part_ptr, part_ptr, cnt_ptr, tile, pid_k, offs, mask, M * N,
                                        SPLIT_K, False)
        if last:
            _store_tile(total, out_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, HAS_BIAS)


@triton.jit
def _finish_gated(acc, out_ptr, part_ptr, cnt_ptr, b_ptr, pid_n, pid_k, offs_n, mask_n, N, N_OUT, stride_on,
                  SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """GATED gemv2 (M = 1): the tile's columns are BLOCK_N / 2 gate columns then the up columns of the same outputs
    (offs_n, of the [2 N_OUT] combined weight); after the single-pass split-K (as _finish_tile), the last slice
    writes out[0, j] = silu(gate_j) * up_j for its BLOCK_N / 2 outputs, rounding as the unfused ops do: each
    product to out's dtype, silu of it to out's dtype, then their product."""
    mask = mask_n[None, :]
    if SPLIT_K == 1:
        last = True
        total = acc
    else:
        last, total, _ = split_k_gather(acc, acc, part_ptr, part_ptr, cnt_ptr, pid_n, pid_k, offs_n[None, :], mask,
                                        N, SPLIT_K, False)
    if last:
        if HAS_BIAS:
            total += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        dt = out_ptr.dtype.element_ty
        t = tl.reshape(total.to(dt).to(tl.float32), (2, BLOCK_N // 2))
        half = tl.arange(0, 2)[:, None]
        g = tl.sum(tl.where(half == 0, t, 0.0), axis=0)
        u = tl.sum(tl.where(half == 1, t, 0.0), axis=0)
        act = (g * tl.sigmoid(g)).to(dt).to(tl.float32)
        j = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + j * stride_on, (act * u).to(dt), mask=j < N_OUT)


@triton.jit
def _gemv2_block(w_ptrs, s_ptr, z_ptr, offs_n, offs_w, mask_n, k0, k_hi, K, stride_qk, stride_sn, stride_sg,
                 stride_zn, stride_zg, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, MULTI: tl.constexpr):
    """gemv2's loads for the K block at k0 (none past k_hi): words [BLOCK_K/8, BLOCK_N], and zero and scale per
    column ([BLOCK_N]) or, MULTI, per word row ([BLOCK_K/8, BLOCK_N]; rows past K read as zero words)."""
    if MULTI:
        rows = k0 // 8 + offs_w
        ok = mask_n[None, :] & (rows < K // 8)[:, None] & (k0 < k_hi)
        w = tl.load(w_ptrs + (k0 // 8) * stride_qk, mask=ok, other=0)
        s, z = _load_group_params(s_ptr, z_ptr, offs_n[None, :], ok, (rows // (GROUP // 8))[:, None], stride_sn,
                                  stride_sg, stride_zn, stride_zg, HAS_ZEROS)
    else:
        ok = mask_n & (k0 < k_hi)
        w = tl.load(w_ptrs + (k0 // 8) * stride_qk, mask=ok[None, :], other=0)
        s, z = _load_group_params(s_ptr, z_ptr, offs_n, ok, k0 // GROUP, stride_sn, stride_sg, stride_zn, stride_zg,
                                  HAS_ZEROS)
    return w, s, z


@triton.jit
def _word_rows_zero_scale(acc_w, xq, xb, xs, z, s, MULTI: tl.constexpr):
    """gemv2's per-word-row accumulation: sum_k x (q - z) s = (sum_k x (B + q) - sum_k x B - z sum_k x) s, zero and
    scale applied once per word row, not per nibble. z, s: [BLOCK_N] (one group per K block) or, MULTI,
    [BLOCK_K/8, BLOCK_N] (a group per word row)."""
    if MULTI:
        acc_w += (xq - xb[:, None] - xs[:, None] * z) * s
    else:
        acc_w += (xq - xb[:, None] - xs[:, None] * z[None, :]) * s[None, :]
    return acc_w


_WORD_PAIRS_PTX = tl.constexpr(word_pairs_ptx())  # kernels/int4_tgemv.py, shared with the tgemv kernel


def _unpack_pairs_ptx() -> str:
    """Multi-row PAIRS, first half of word_pairs_ptx: word $4 -> its 8 nibbles as four packed bf16x2 (q - 8) pairs
    $0..$3 (pair m: nibbles 2m, 2m + 1, in x's own pair order), unpacked once for every row of x."""
    lop = "".join(f"\n    prmt.b32 ${m}, $4, s4, {(m | m << 4 | (4 + m) << 8 | (4 + m) << 12):#06x};"
                  f"\n    lop3.b32 ${m}, ${m}, 0x000F000F, 0x43004300, 0xEA;"
                  f"\n    fma.rn.bf16x2 ${m}, ${m}, one, c8;" for m in range(4))
    return f"""
    {{
    .reg .b32 s4, one, c8;
    mov.b32 one, 0x3F803F80;
    mov.b32 c8, 0xC308C308;
    shr.u32 s4, $4, 4;{lop}
    }}
    """


def _pairs_dot_ptx() -> str:
    """Multi-row PAIRS, second half of word_pairs_ptx: the four (q - 8) pairs $1..$4 against one row's four x pairs
    $5..$8 -> the fp32 sum $0 (four packed FMAs into two bf16 lanes, then the lanes to fp32 and added): per row the
    same instructions, in the same order, as the one-row PAIRS, so each row's sums are the one-row kernel's bit for
    bit."""
    return """
    {
    .reg .b32 nz, acc, lo, hi;
    mov.b32 nz, 0x80008000;
    fma.rn.bf16x2 acc, $1, $5, nz;
    fma.rn.bf16x2 acc, $2, $6, acc;
    fma.rn.bf16x2 acc, $3, $7, acc;
    fma.rn.bf16x2 acc, $4, $8, acc;
    shl.b32 lo, acc, 16;
    and.b32 hi, acc, 0xFFFF0000;
    add.f32 $0, lo, hi;
    }
    """


_UNPACK_PAIRS_PTX = tl.constexpr(_unpack_pairs_ptx())
_PAIRS_DOT_PTX = tl.constexpr(_pairs_dot_ptx())


@triton.jit
def _bf16_pair_sum(p):
    """x's bf16 pair packed in an int32 -> the fp32 sum of its two halves (exact conversions)."""
    return (p << 16).to(tl.float32, bitcast=True) + (p & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _pair_x(x_row, kx, x_ok, stride_xk, ASM: tl.constexpr, MASK_X: tl.constexpr = True):
    """PAIRS' x for word rows starting at kx [R]: ASM, bf16 x (contiguous, 4-byte aligned rows: the launcher sees to
    it) as four int32 pairs [R] (k, k + 1 .. k + 6, k + 7); else (interpreter, any dtype) the 8 values as one fp32
    [R, 8] tile, returned four times (the same tuple shape). MASK_X=False: every row is inside K, loads unmasked."""
    if ASM:
        xi = x_row.to(tl.pointer_type(tl.int32)) + (kx >> 1)  # (kx >= 0: a shift, not a signed division)
        if MASK_X:
            p0 = tl.load(xi, mask=x_ok, other=0)
            p1 = tl.load(xi + 1, mask=x_ok, other=0)
            p2 = tl.load(xi + 2, mask=x_ok, other=0)
            p3 = tl.load(xi + 3, mask=x_ok, other=0)
        else:
            p0 = tl.load(xi)
            p1 = tl.load(xi + 1)
            p2 = tl.load(xi + 2)
            p3 = tl.load(xi + 3)
        return p0, p1, p2, p3
    else:
        offs_j = tl.arange(0, 8)
        xt = tl.load(x_row + (kx[:, None] + offs_j[None, :]) * stride_xk, mask=x_ok[:, None], other=0.0)
        xt = xt.to(tl.float32)
        return xt, xt, xt, xt


@triton.jit
def _pair_sums_of(w, p0, p1, p2, p3, NEED_XS: tl.constexpr, ASM: tl.constexpr):
    """PAIRS: per word of w [R, C], the fp32 sum of x_k (q_k - 8) over its 8 nibbles, from _pair_x's x; and (NEED_XS)
    per word row the sum of its 8 x. ASM: _WORD_PAIRS_PTX; else the same sums in plain fp32 Triton."""
    if ASM:
        ws = tl.inline_asm_elementwise(asm=_WORD_PAIRS_PTX, constraints="=r,r,r,r,r,r",
                                       args=[w, p0[:, None], p1[:, None], p2[:, None], p3[:, None]],
                                       dtype=tl.float32, is_pure=True, pack=1)
        if NEED_XS:
            xs = _bf16_pair_sum(p0) + _bf16_pair_sum(p1) + _bf16_pair_sum(p2) + _bf16_pair_sum(p3)
        else:
            xs = tl.zeros(p0.shape, dtype=tl.float32)
    else:
        offs_j = tl.arange(0, 8)
        ws = tl.zeros(w.shape, dtype=tl.float32)
        for i in tl.static_range(8):
            xi = tl.sum(tl.where(offs_j[None, :] == i, p0, 0.0), axis=1)
            ws += (((w >> (4 * i)) & 0xF).to(tl.float32) - 8.0) * xi[:, None]
        xs = tl.sum(p0, axis=1)
    return ws, xs


@triton.jit
def _unpack_pairs(w, ASM: tl.constexpr):
    """Multi-row PAIRS: the word tile w [R, C] as four packed bf16x2 (q - 8) pair tiles (ASM: _UNPACK_PAIRS_PTX),
    shared by every x row; else (the interpreter) w itself four times, unpacked again by _row_pair_acc."""
    if ASM:
        t0, t1, t2, t3 = tl.inline_asm_elementwise(asm=_UNPACK_PAIRS_PTX, constraints="=r,=r,=r,=r,r", args=[w],
                                                   dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
                                                   pack=1)
        return t0, t1, t2, t3
    else:
        return w, w, w, w


@triton.jit
def _row_pair_acc(acc_w, t0, t1, t2, t3, x_row, row_ok, kx, x_ok, stride_xk, s, z, HAS_ZEROS: tl.constexpr,
                  MULTI: tl.constexpr, ASM: tl.constexpr):
    """Multi-row PAIRS, one x row: acc_w [R, C] += its word sums (_PAIRS_DOT_PTX on _unpack_pairs' tiles: the one-row
    kernel's instructions for the sums, bit for bit) with zero and scale per word row, as the one-row loop does."""
    p0, p1, p2, p3 = _pair_x(x_row, kx, x_ok & row_ok, stride_xk, ASM)  # masked: the row may lie past M
    if ASM:
        ws = tl.inline_asm_elementwise(asm=_PAIRS_DOT_PTX, constraints="=r,r,r,r,r,r,r,r,r",
                                       args=[t0, t1, t2, t3, p0[:, None], p1[:, None], p2[:, None], p3[:, None]],
                                       dtype=tl.float32, is_pure=True, pack=1)
        if HAS_ZEROS:
            xs = _bf16_pair_sum(p0) + _bf16_pair_sum(p1) + _bf16_pair_sum(p2) + _bf16_pair_sum(p3)
        else:
            xs = tl.zeros(p0.shape, dtype=tl.float32)  # unused: symmetric weights need no x sums
    else:
        ws, xs = _pair_sums_of(t0, p0, p1, p2, p3, HAS_ZEROS, ASM)
    return _pairs_zero_scale(acc_w, ws, xs, z, s, HAS_ZEROS, MULTI)


@triton.jit
def _pairs_zero_scale(acc_w, ws, xs, z, s, HAS_ZEROS: tl.constexpr, MULTI: tl.constexpr):
    """PAIRS: acc_w [R, C] += (word sums + (8 - z) x sums) * s, zero and scale per word row (MULTI: [R, C] tiles)
    or per column; sum_k x (q - z) = sum_k x (q - 8) + (8 - z) sum_k x, so symmetric weights need no x sums."""
    if HAS_ZEROS:
        if MULTI:
            acc_w += (ws + xs[:, None] * (8.0 - z)) * s
        else:
            acc_w += (ws + xs[:, None] * (8.0 - z)[None, :]) * s[None, :]
    elif MULTI:
        acc_w += ws * s
    else:
        acc_w += ws * s[None, :]
    return acc_w


@triton.jit
def _word_pair_sums(w, x_row, kx, x_ok, stride_xk, NEED_XS: tl.constexpr, ASM: tl.constexpr,
                    MASK_X: tl.constexpr = True):
    """PAIRS: per word of w [R, C] (word row r holds k = kx[r] .. kx[r] + 7), the fp32 sum of x_k (q_k - 8), and
    (NEED_XS) per word row the sum of its 8 x, with x loaded here (_pair_x, then _pair_sums_of)."""
    p0, p1, p2, p3 = _pair_x(x_row, kx, x_ok, stride_xk, ASM, MASK_X)
    return _pair_sums_of(w, p0, p1, p2, p3, NEED_XS, ASM)


@triton.jit
def _int4_gemv2_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, K, K_PER_SPLIT, ZERO,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_om, stride_on,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    LOAD_STAGES: tl.constexpr, PLANES: tl.constexpr, PAIRS: tl.constexpr = False, ASM: tl.constexpr = False,
    PREFETCH_X: tl.constexpr = False, GATED: tl.constexpr = False, N_OUT=0, PDL: tl.constexpr = False,
):
    if PDL:  # kernels/pdl.py: the next PDL launch may start during this kernel's last wave
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_j = tl.arange(0, 8)
    if GATED:
        # SwiGLU (BLOCK_M == 1): N = 2 N_OUT columns, gate then up; a tile takes BLOCK_N / 2 of each, same outputs
        cols = tl.arange(0, BLOCK_N)
        j_out = pid_n * (BLOCK_N // 2) + cols % (BLOCK_N // 2)
        offs_n = j_out + (cols // (BLOCK_N // 2)) * N_OUT
        mask_n = j_out < N_OUT
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    w_ptrs = qw_ptr + offs_n[None, :] * stride_qn + offs_w[:, None] * stride_qk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # BLOCK_M == 1: per-(word row, column) accumulator, reduced across rows (and warps) once at the end
    acc_w = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    # Multi-row PAIRS (BLOCK_M 2 or 4): one such accumulator per x row (rows 1-3 unused below their BLOCK_M)
    ROWS: tl.constexpr = PAIRS and BLOCK_M > 1
    acc_w1 = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    acc_w2 = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    acc_w3 = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    # MULTI: a K block spans BLOCK_K / GROUP groups (BLOCK_M == 1, or PAIRS): zero and scale are loaded per word
    # row ([BLOCK_K/8, BLOCK_N], each group's row repeated GROUP/8 times: L1 hits) and applied per word row.
    MULTI: tl.constexpr = BLOCK_K > GROUP
    if PREFETCH:
        w, s, z = _gemv2_block(w_ptrs, s_ptr, z_ptr, offs_n, offs_w, mask_n, k_lo, k_hi, K, stride_qk, stride_sn,
                               stride_sg, stride_zn, stride_zg, GROUP, HAS_ZEROS, MULTI)
    if PDL:  # the first K block's constant words / scales / zeros are in flight; x and the outputs wait for the
        gdc_wait()  # kernel before (its writes visible)
    if PREFETCH_X:  # PAIRS: x of the next K block loaded with its words (masked past the slice: never used)
        kxn = k_lo + offs_w * 8
        xp0, xp1, xp2, xp3 = _pair_x(x_ptr + pid_m * stride_xm, kxn, (kxn < k_hi) & (pid_m < M), stride_xk, ASM)
    if PREFETCH == 2:  # two K blocks in flight: the one after next, too
        w2, s2, z2 = _gemv2_block(w_ptrs, s_ptr, z_ptr, offs_n, offs_w, mask_n, k_lo + BLOCK_K, k_hi, K, stride_qk,
                                  stride_sn, stride_sg, stride_zn, stride_zg, GROUP, HAS_ZEROS, MULTI)
    # tl.range's num_stages pipelines the word / scale / x loads through shared memory by cp.async
    # (LOAD_STAGES - 1 K blocks ahead); a plain range loop without a dot is never pipelined by Triton 3.6,
    # whatever the kernel's num_stages (offline sm_90a compiles), hence PREFETCH's register double buffer.
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOAD_STAGES):
        if PREFETCH == 2:
            w_cur, s_cur, z_cur = w, s, z
            w, s, z = w2, s2, z2
            w2, s2, z2 = _gemv2_block(w_ptrs, s_ptr, z_ptr, offs_n, offs_w, mask_n, k0 + 2 * BLOCK_K, k_hi, K,
                                      stride_qk, stride_sn, stride_sg, stride_zn, stride_zg, GROUP, HAS_ZEROS, MULTI)
        elif PREFETCH:
            # Register double buffer: the next block's words are in flight while this one is unpacked.
            w_cur, s_cur, z_cur = w, s, z
            w, s, z = _gemv2_block(w_ptrs, s_ptr, z_ptr, offs_n, offs_w, mask_n, k0 + BLOCK_K, k_hi, K, stride_qk,
                                   stride_sn, stride_sg, stride_zn, stride_zg, GROUP, HAS_ZEROS, MULTI)
        else:
            w_cur, s_cur, z_cur = _gemv2_block(w_ptrs, s_ptr, z_ptr, offs_n, offs_w, mask_n, k0, k_hi, K,
                                               stride_qk, stride_sn, stride_sg, stride_zn, stride_zg, GROUP,
                                               HAS_ZEROS, MULTI)
        if ROWS:
            # Multi-row PAIRS: each word unpacked once into bf16x2 (q - 8) pairs (_unpack_pairs), then per x row the
            # one-row loop's 4 HFMA2, lane sum, zero and scale (_row_pair_acc), each row in the one-row layout.
            kx = k0 + offs_w * 8
            x_ok = kx < K
            t0, t1, t2, t3 = _unpack_pairs(w_cur, ASM)
            row0 = pid_m * BLOCK_M
            acc_w = _row_pair_acc(acc_w, t0, t1, t2, t3, x_ptr + row0 * stride_xm, row0 < M, kx, x_ok, stride_xk,
                                  s_cur, z_cur, HAS_ZEROS, MULTI, ASM)
            acc_w1 = _row_pair_acc(acc_w1, t0, t1, t2, t3, x_ptr + (row0 + 1) * stride_xm, row0 + 1 < M, kx, x_ok,
                                   stride_xk, s_cur, z_cur, HAS_ZEROS, MULTI, ASM)
            if BLOCK_M == 4:
                acc_w2 = _row_pair_acc(acc_w2, t0, t1, t2, t3, x_ptr + (row0 + 2) * stride_xm, row0 + 2 < M, kx, x_ok,
                                       stride_xk, s_cur, z_cur, HAS_ZEROS, MULTI, ASM)
                acc_w3 = _row_pair_acc(acc_w3, t0, t1, t2, t3, x_ptr + (row0 + 3) * stride_xm, row0 + 3 < M, kx, x_ok,
                                       stride_xk, s_cur, z_cur, HAS_ZEROS, MULTI, ASM)
        elif PAIRS:
            # Packed bf16x2 word sums (BLOCK_M == 1; _word_pair_sums): sum_k x (q - z) = sum_k x (q - 8) + (8 - z) sum_k x,
            # so symmetric weights need no x sums at all.
            kx = k0 + offs_w * 8
            if PREFETCH_X:
                xc0, xc1, xc2, xc3 = xp0, xp1, xp2, xp3
                kxn = kx + BLOCK_K
                xp0, xp1, xp2, xp3 = _pair_x(x_ptr + pid_m * stride_xm, kxn, (kxn < k_hi) & (pid_m < M), stride_xk,
                                             ASM)
                ws, xs = _pair_sums_of(w_cur, xc0, xc1, xc2, xc3, HAS_ZEROS, ASM)
            else:
                ws, xs = _word_pair_sums(w_cur, x_ptr + pid_m * stride_xm, kx, (kx < K) & (pid_m < M), stride_xk,
                                         HAS_ZEROS, ASM, MULTI)
            acc_w = _pairs_zero_scale(acc_w, ws, xs, z_cur, s_cur, HAS_ZEROS, MULTI)
        elif PLANES:
            # One nibble plane at a time on the [BLOCK_K/8, BLOCK_N] word tile in its load layout: x_j (k = k0 + 8r
            # + j) is a [BLOCK_K/8] vector per plane, no [.., 8, ..] tensor, so no shared-memory relayout of the
            # words or broadcast of x to every thread (BLOCK_M == 1).
            kx = k0 + offs_w * 8
            x_mask = (kx < K) & (pid_m < M)
            x_ptrs = x_ptr + pid_m * stride_xm + kx * stride_xk
            xq = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
            xb = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
            xs = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(x_ptrs + j * stride_xk, mask=x_mask, other=0.0).to(tl.float32)
                bqj, bj = _nibble_plane(w_cur, j, ZERO)
                xq += bqj * xj[:, None]
                xb += xj * bj
                xs += xj
            acc_w = _word_rows_zero_scale(acc_w, xq, xb, xs, z_cur, s_cur, MULTI)
        else:
            # [BLOCK_K/8, 8, BLOCK_N] values B_j + q (k = k0 + 8 * word + j), one LOP3 each, no bias FADD:
            # sum_j x_j (B_j + q_j) - sum_j x_j B_j is the dot with q; the second sum is per word row only.
            bq, bias = _unpack_nibbles_biased(w_cur, ZERO)
            for i in tl.static_range(BLOCK_M):
                row = pid_m * BLOCK_M + i
                kx = k0 + offs_w[:, None] * 8 + offs_j[None, :]
                if MULTI:  # the last K block may run past K
                    x_mask = (kx < K) & (row < M)
                else:
                    x_mask = (offs_w[:, None] >= 0) & (row < M)
                x = tl.load(x_ptr + row * stride_xm + kx * stride_xk, mask=x_mask, other=0.0).to(tl.float32)
                xq = tl.sum(bq * x[:, :, None], axis=1)  # [BLOCK_K/8, BLOCK_N], in-thread over the 8 nibbles
                xb = tl.sum(x * bias[None, :], axis=1)
                xs = tl.sum(x, axis=1)
                if BLOCK_M == 1:
                    acc_w = _word_rows_zero_scale(acc_w, xq, xb, xs, z_cur, s_cur, MULTI)
                else:
                    part = (tl.sum(xq - xb[:, None], axis=0) - tl.sum(xs, axis=0) * z_cur) * s_cur
                    acc = tl.where((offs_m == row)[:, None], acc + part[None, :], acc)
    if BLOCK_M == 1:
        acc = tl.sum(acc_w, axis=0)[None, :] + acc
    if ROWS:
        row_in = offs_m - pid_m * BLOCK_M
        acc = tl.where((row_in == 0)[:, None], tl.sum(acc_w, axis=0)[None, :], acc)
        acc = tl.where((row_in == 1)[:, None], tl.sum(acc_w1, axis=0)[None, :], acc)
        if BLOCK_M == 4:
            acc = tl.where((row_in == 2)[:, None], tl.sum(acc_w2, axis=0)[None, :], acc)
            acc = tl.where((row_in == 3)[:, None], tl.sum(acc_w3, axis=0)[None, :], acc)
    if GATED:
        _finish_gated(acc, out_ptr, part_ptr, cnt_ptr, b_ptr, pid_n, pid_k, offs_n, mask_n, N, N_OUT, stride_on,
                      SPLIT_K, HAS_BIAS, BLOCK_N)
    else:
        _finish_tile(acc, out_ptr, part_ptr, cnt_ptr, b_ptr, pid_m * tl.num_programs(0) + pid_n, pid_k,
                     offs_m, offs_n, M, N, stride_om, stride_on, SPLIT_K, HAS_BIAS)


@triton.jit
def _int4_tiled2_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, K, K_PER_SPLIT, ZERO,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_om, stride_on,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=mask_m[:, None], other=0.0)
        w = tl.load(qw_ptr + offs_n[None, :] * stride_qn + (k0 // 8 + offs_w)[:, None] * stride_qk,
                    mask=mask_n[None, :], other=0)
        s, z = _load_group_params(s_ptr, z_ptr, offs_n, mask_n, k0 // GROUP, stride_sn, stride_sg,
                                  stride_zn, stride_zg, HAS_ZEROS)
        bq, bias = _unpack_nibbles_biased(w, ZERO)
        # (B + q) - (B + z) = q - z exactly (B <= 2^11, z a 16-bit float), times s: the reference's fp32
        # value, rounded once to x's dtype; no I2F anywhere.
        wd = (bq - (bias[:, None] + z[None, :])[None, :, :]) * s[None, None, :]
        wd = tl.reshape(wd, (BLOCK_K, BLOCK_N)).to(a.dtype)
        acc = tl.dot(a, wd, acc, input_precision=DOT_PRECISION)
    _finish_tile(acc, out_ptr, part_ptr, cnt_ptr, b_ptr, pid, pid_k, offs_m, offs_n, M, N,
                 stride_om, stride_on, SPLIT_K, HAS_BIAS)


@triton.jit
def _x_planes(x_ptr, xt_ptrs, offs_m, offs_k, mask_m, k0, valid, stride_xm, stride_xk):
    """x's block at k0 as 8 planes x_j^T [BLOCK_K/8, BLOCK_M] (x[m, k0 + 8r + j]) and sum_k x [BLOCK_M] in fp32;
    zeros where not `valid` (past the slice: the prefetch after the last block)."""
    mt = mask_m[None, :] & valid
    x0 = tl.load(xt_ptrs + (k0 + 0) * stride_xk, mask=mt, other=0.0)
    x1 = tl.load(xt_ptrs + (k0 + 1) * stride_xk, mask=mt, other=0.0)
    x2 = tl.load(xt_ptrs + (k0 + 2) * stride_xk, mask=mt, other=0.0)
    x3 = tl.load(xt_ptrs + (k0 + 3) * stride_xk, mask=mt, other=0.0)
    x4 = tl.load(xt_ptrs + (k0 + 4) * stride_xk, mask=mt, other=0.0)
    x5 = tl.load(xt_ptrs + (k0 + 5) * stride_xk, mask=mt, other=0.0)
    x6 = tl.load(xt_ptrs + (k0 + 6) * stride_xk, mask=mt, other=0.0)
    x7 = tl.load(xt_ptrs + (k0 + 7) * stride_xk, mask=mt, other=0.0)
    xs = tl.sum(tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                        mask=mask_m[:, None] & valid, other=0.0).to(tl.float32), axis=1)
    return x0, x1, x2, x3, x4, x5, x6, x7, xs


@triton.jit
def _int4_tiled3_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, K, K_PER_SPLIT, ZERO,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_om, stride_on,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Swap-AB: out^T [BLOCK_N, BLOCK_M] = W [BLOCK_N, K] @ x^T [K, BLOCK_M], one dot per nibble plane j:
    (B + q_j) [BLOCK_N, BLOCK_K/8] (nibble j of each word) @ x_j^T [BLOCK_K/8, BLOCK_M], x_j = x[:, k0 + 8r + j].
    B + q is exact in x's dtype (bits 0x4300 | q in bf16 = 128 + q, 0x6400 | q in fp16 = 1024 + q), so
    the weight operand is two integer ops per nibble away from the word; zero and scale, per output row
    here, are applied to the block's fp32 dot: s (dot - (B + z) sum_k x)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    w_ptrs = qw_ptr + offs_n[:, None] * stride_qn + offs_w[None, :] * stride_qk
    xt_ptrs = x_ptr + offs_m[None, :] * stride_xm + (offs_w * 8)[:, None] * stride_xk
    xdt = x_ptr.dtype.element_ty
    if xdt == tl.bfloat16:
        HI: tl.constexpr = 0x4300
        BIAS: tl.constexpr = 128.0
    else:
        HI: tl.constexpr = 0x6400
        BIAS: tl.constexpr = 1024.0
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # x's planes for the next block are loaded (registers) while this block's dots run: they are gathers
    # (stride 8), which Triton cannot pipeline through cp.async, and each feeds a wgmma through shared
    # memory, so loaded in place they would expose an L2 latency per plane.
    x0, x1, x2, x3, x4, x5, x6, x7, xs = _x_planes(x_ptr, xt_ptrs, offs_m, offs_k, mask_m, k_lo, k_lo < k_hi,
                                                   stride_xm, stride_xk)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = tl.load(w_ptrs + (k0 // 8) * stride_qk, mask=mask_n[:, None], other=0)
        s, z = _load_group_params(s_ptr, z_ptr, offs_n, mask_n, k0 // GROUP, stride_sn, stride_sg,
                                  stride_zn, stride_zg, HAS_ZEROS)
        c0, c1, c2, c3, c4, c5, c6, c7, cs = x0, x1, x2, x3, x4, x5, x6, x7, xs
        x0, x1, x2, x3, x4, x5, x6, x7, xs = _x_planes(x_ptr, xt_ptrs, offs_m, offs_k, mask_m, k0 + BLOCK_K,
                                                       k0 + BLOCK_K < k_hi, stride_xm, stride_xk)
        # nibbles j and j + 4 of a word, each under the exponent in its 16-bit half: one LOP3 per pair
        hi2: tl.constexpr = HI * 0x10001
        p0 = (w & 0x000F000F) | hi2
        p1 = ((w >> 4) & 0x000F000F) | hi2
        p2 = ((w >> 8) & 0x000F000F) | hi2
        p3 = ((w >> 12) & 0x000F000F) | hi2
        blk = tl.dot(p0.to(tl.int16).to(xdt, bitcast=True), c0, input_precision=DOT_PRECISION)
        blk = tl.dot(p1.to(tl.int16).to(xdt, bitcast=True), c1, blk, input_precision=DOT_PRECISION)
        blk = tl.dot(p2.to(tl.int16).to(xdt, bitcast=True), c2, blk, input_precision=DOT_PRECISION)
        blk = tl.dot(p3.to(tl.int16).to(xdt, bitcast=True), c3, blk, input_precision=DOT_PRECISION)
        blk = tl.dot((p0 >> 16).to(tl.int16).to(xdt, bitcast=True), c4, blk, input_precision=DOT_PRECISION)
        blk = tl.dot((p1 >> 16).to(tl.int16).to(xdt, bitcast=True), c5, blk, input_precision=DOT_PRECISION)
        blk = tl.dot((p2 >> 16).to(tl.int16).to(xdt, bitcast=True), c6, blk, input_precision=DOT_PRECISION)
        blk = tl.dot((p3 >> 16).to(tl.int16).to(xdt, bitcast=True), c7, blk, input_precision=DOT_PRECISION)
        acc += (blk - (z + BIAS)[:, None] * cs[None, :]) * s[:, None]
    _finish_tile(tl.trans(acc), out_ptr, part_ptr, cnt_ptr, b_ptr, pid_m * tl.num_programs(0) + pid_n, pid_k,
                 offs_m, offs_n, M, N, stride_om, stride_on, SPLIT_K, HAS_BIAS)


@triton.jit
def _nib16(w, shift: tl.constexpr, HI: tl.constexpr, xdt: tl.constexpr):
    """Nibble at bit `shift` of every word as the 16-bit float B + q (bits HI | q): the plain-Triton twin of the
    inline-asm unpack below (same values, one 16-bit result per op)."""
    return (((w >> shift) & 0xF) | HI).to(tl.int16).to(xdt, bitcast=True)


def _nibble_pairs_ptx(hi2: int, center: tuple = ()) -> str:
    """_nibble_pairs' PTX for one exponent pair `hi2` (bf16 0x43004300, fp16 0x64006400): word $8 -> four
    registers of two 16-bit halves each, lop3((w >> 4m) & 0x000F000F | hi2), split into $0..$7. `center` =
    (packed fma op, one x2, -(B + 8) x2): one FMA per register after the LOP3, x 1 - (B + 8), exact: the symmetric
    weight q - 8 straight out of the unpack (the FMA's operands must be registers; ptxas hoists their moves)."""
    consts = fix = ""
    if center:
        op, one, c8 = center
        consts = f"\n    .reg .b32 one, c8;\n    mov.b32 one, {one:#010x};\n    mov.b32 c8, {c8:#010x};"
        fix = "".join(f"\n    {op} t{i}, t{i}, one, c8;" for i in range(4))
    return f"""
    {{
    .reg .b32 t<4>;{consts}
    shr.u32 t1, $8, 4;
    shr.u32 t2, $8, 8;
    shr.u32 t3, $8, 12;
    lop3.b32 t0, $8, 0x000F000F, {hi2:#010x}, 0xEA;
    lop3.b32 t1, t1, 0x000F000F, {hi2:#010x}, 0xEA;
    lop3.b32 t2, t2, 0x000F000F, {hi2:#010x}, 0xEA;
    lop3.b32 t3, t3, 0x000F000F, {hi2:#010x}, 0xEA;{fix}
    mov.b32 {{$0, $1}}, t0;
    mov.b32 {{$2, $3}}, t1;
    mov.b32 {{$4, $5}}, t2;
    mov.b32 {{$6, $7}}, t3;
    }}
    """


_NIBBLE_PAIRS_PTX_BF16 = tl.constexpr(_nibble_pairs_ptx(0x43004300))
_NIBBLE_PAIRS_PTX_FP16 = tl.constexpr(_nibble_pairs_ptx(0x64006400))
# Centered (q - 8): bf16 1.0 = 0x3F80, -(128 + 8) = 0xC308; fp16 1.0 = 0x3C00, -(1024 + 8) = 0xE408.
_NIBBLE_PAIRS_PTX_BF16_C8 = tl.constexpr(_nibble_pairs_ptx(0x43004300, ("fma.rn.bf16x2", 0x3F803F80, 0xC308C308)))
_NIBBLE_PAIRS_PTX_FP16_C8 = tl.constexpr(_nibble_pairs_ptx(0x64006400, ("fma.rn.f16x2", 0x3C003C00, 0xE408E408)))


@triton.jit
def _nibble_pairs(w, xdt: tl.constexpr, ASM: tl.constexpr, CENTER: tl.constexpr = False):
    """[R, C] int32 words -> 8 tensors [R, C] of x's 16-bit dtype: o[2m] = B + nibble m, o[2m + 1] = B + nibble
    m + 4 (m = 0..3), exact (bf16 0x4300 | q = 128 + q, fp16 0x6400 | q = 1024 + q). CENTER: nibble - 8 instead
    (one more packed FMA per pair, exact).

    ASM: (o[2m], o[2m + 1]) are the two halves of ONE 32-bit register, ``lop3((w >> 4m), 0x000F000F, HI:HI)``
    (one SHF + one LOP3 per nibble pair, no SHF for m = 0: 7 instructions per word); the caller lays the pairs
    out so that each half pair is a pair of adjacent k of the dot's register operand, so ptxas needs no
    PRMT to pack them. Not under the interpreter (no PTX there): the plain path computes the same values."""
    if ASM and CENTER:
        if xdt == tl.bfloat16:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                asm=_NIBBLE_PAIRS_PTX_BF16_C8, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r", args=[w], is_pure=True,
                pack=1, dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                               tl.bfloat16, tl.bfloat16))
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                asm=_NIBBLE_PAIRS_PTX_FP16_C8, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r", args=[w], is_pure=True,
                pack=1, dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                               tl.float16))
    elif ASM:  # (the output dtypes must be literal dtypes, not the constexpr xdt: one call per dtype)
        if xdt == tl.bfloat16:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                asm=_NIBBLE_PAIRS_PTX_BF16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r", args=[w], is_pure=True, pack=1,
                dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                       tl.bfloat16))
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                asm=_NIBBLE_PAIRS_PTX_FP16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r", args=[w], is_pure=True, pack=1,
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                       tl.float16))
    else:
        HI: tl.constexpr = 0x4300 if xdt == tl.bfloat16 else 0x6400
        o0 = _nib16(w, 0, HI, xdt)
        o1 = _nib16(w, 16, HI, xdt)
        o2 = _nib16(w, 4, HI, xdt)
        o3 = _nib16(w, 20, HI, xdt)
        o4 = _nib16(w, 8, HI, xdt)
        o5 = _nib16(w, 24, HI, xdt)
        o6 = _nib16(w, 12, HI, xdt)
        o7 = _nib16(w, 28, HI, xdt)
        if CENTER:
            C: tl.constexpr = 136.0 if xdt == tl.bfloat16 else 1032.0
            o0 = (o0.to(tl.float32) - C).to(xdt)
            o1 = (o1.to(tl.float32) - C).to(xdt)
            o2 = (o2.to(tl.float32) - C).to(xdt)
            o3 = (o3.to(tl.float32) - C).to(xdt)
            o4 = (o4.to(tl.float32) - C).to(xdt)
            o5 = (o5.to(tl.float32) - C).to(xdt)
            o6 = (o6.to(tl.float32) - C).to(xdt)
            o7 = (o7.to(tl.float32) - C).to(xdt)
    return o0, o1, o2, o3, o4, o5, o6, o7


@triton.jit
def _tcasm_operand(w, xdt: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr,
                   CENTER: tl.constexpr = False):
    """Words [BLOCK_N, SUB/8] -> the dot's weight operand [BLOCK_N, SUB] of B + q, its columns in the permuted
    order of `_tcasm_k_order`: the 8 values of a word are one thread's 8 elements of a 32-column chunk of the
    16-bit wgmma/mma register fragment (columns 2t, 2t+1, 2t+8, 2t+9 of each of two k16 steps, t = lane % 4),
    so the unpack needs no shuffle: word t of a chunk goes whole to lane t."""
    o0, o1, o2, o3, o4, o5, o6, o7 = _nibble_pairs(w, xdt, ASM, CENTER)
    # o[i], i = 4 kb + 2 h + p -> [.., kb, h, p] (p fastest: the two halves of one asm register)
    t = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
    t = tl.reshape(t, (BLOCK_N, SUB // 32, 4, 2, 2, 2))  # [n, c, t, kb, h, p]: word r = 4 c + t
    t = tl.permute(t, (0, 1, 3, 4, 2, 5))  # [n, c, kb, h, t, p]: column 32 c + 16 kb + 8 h + 2 t + p
    return tl.reshape(t, (BLOCK_N, SUB))


@triton.jit
def _tcasm_k_order(SUB: tl.constexpr):
    """k (within a sub-block) of each dot column kk = 32 c + 16 kb + 8 h + 2 t + p of `_tcasm_operand`: word
    4 c + t, nibble 2 kb + h + 4 p (o[2m] / o[2m + 1] are nibbles m / m + 4)."""
    kk = tl.arange(0, SUB)
    return (kk // 32) * 32 + ((kk // 2) % 4) * 8 + ((kk // 16) % 2) * 2 + (kk // 8) % 2 + (kk % 2) * 4


@triton.jit
def _tcasm_rows(BLOCK_N: tl.constexpr, WARPS: tl.constexpr):
    """n (within the tile) of each dot row rho = (b WARPS + v) 16 + 8 h + g, where the 16-bit register fragment
    gives lane g (lane // 4) of warp v rows g and g + 8 (h) of each 16-row slab, slab b repeated every 16 WARPS
    rows: n = ((v 8 + g) REP + b) 2 + h, so a lane's 2 REP rows are consecutive n (the words' vector loads).
    Any bijection is correct (the scales, zeros and outputs follow the same rows); this one is fast only if
    Triton lays the accumulator out with warpsPerCTA [WARPS, 1] (what it does for a 16-column wgmma)."""
    REP: tl.constexpr = BLOCK_N // (16 * WARPS)
    rho = tl.arange(0, BLOCK_N)
    if REP == 0:  # fewer rows than one slab per warp: identity
        return rho
    b = rho // (16 * WARPS)
    v = (rho // 16) % WARPS
    return ((v * 8 + rho % 8) * REP + b) * 2 + (rho // 8) % 2


@triton.jit
def _int4_tcasm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
    M, N, K, K_PER_SPLIT, ZERO,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_om, stride_on,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr, WARPS: tl.constexpr,
    DIRECT: tl.constexpr = 0,
):
    """Swap-AB tensor-core GEMV/GEMM: out^T [BLOCK_N, BLOCK_M] = W [BLOCK_N, K] @ x^T [K, BLOCK_M] with the
    weight as the dot's register operand, two nibbles per 32-bit unpack instruction (see `_nibble_pairs`), and
    the dot's K order permuted so that the pairs land where the register fragment wants them (x is gathered in
    the same order: the sum over k does not care). Zero and scale per (row, group) on the fp32 dot of each
    group: s (dot - (B + z) sum_k x), more exact than the reference's weight rounded to x's dtype.
    Measured on the H200: see the module docstring."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Dot row rho holds column n(rho) of the tile (see _tcasm_rows): a lane's rows of the fragment are consecutive n,
    # so its words are 16-byte vectors of the N-contiguous storage.
    offs_n = pid_n * BLOCK_N + _tcasm_rows(BLOCK_N, WARPS)
    mask_n = offs_n < N
    mask_m = offs_m < M
    SUB: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP  # one group per dot
    NSUB: tl.constexpr = BLOCK_K // SUB
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    offs_nat = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # the words are loaded in n order, then permuted
    mask_nat = offs_nat < N
    if DIRECT:  # words loaded in the dot's row order (no relayout of the loaded tile)
        w_ptrs = qw_ptr + offs_n[:, None] * stride_qn + tl.arange(0, SUB // 8)[None, :] * stride_qk
        mask_nat = mask_n
    else:
        w_ptrs = qw_ptr + offs_nat[:, None] * stride_qn + tl.arange(0, SUB // 8)[None, :] * stride_qk
    xt_ptrs = x_ptr + offs_m[None, :] * stride_xm + _tcasm_k_order(SUB)[:, None] * stride_xk
    xdt = x_ptr.dtype.element_ty
    if xdt == tl.bfloat16:
        BIAS: tl.constexpr = 128.0
    else:
        BIAS: tl.constexpr = 1024.0
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if DIRECT:
        # One group-sized sub-block per iteration, the next one's x^T / scale / zero in flight (register double
        # buffer: Triton pipelines the words through cp.async but not these). Symmetric weights need no
        # cross-thread column sum of x^T (shared memory and barriers every group) for the zero's correction
        # -(B + 8) sum_k x: DIRECT=1 gets it from a second dot with a constant operand, DIRECT=2 from an unpack
        # that yields q - 8 itself.
        ok = k_lo < k_hi
        xt_n = tl.load(xt_ptrs + k_lo * stride_xk, mask=mask_m[None, :] & ok, other=0.0)
        s_n, z_n = _load_group_params(s_ptr, z_ptr, offs_n, mask_n & ok, k_lo // GROUP, stride_sn, stride_sg,
                                      stride_zn, stride_zg, HAS_ZEROS)
        for ks in tl.range(k_lo, k_hi, SUB):
            xt, s, z = xt_n, s_n, z_n
            ok = ks + SUB < k_hi
            xt_n = tl.load(xt_ptrs + (ks + SUB) * stride_xk, mask=mask_m[None, :] & ok, other=0.0)
            s_n, z_n = _load_group_params(s_ptr, z_ptr, offs_n, mask_n & ok, (ks + SUB) // GROUP, stride_sn,
                                          stride_sg, stride_zn, stride_zg, HAS_ZEROS)
            w = tl.load(w_ptrs + (ks // 8) * stride_qk, mask=mask_nat[:, None], other=0)
            if HAS_ZEROS:
                a = _tcasm_operand(w, xdt, ASM, BLOCK_N, SUB)
                cs = tl.sum(xt.to(tl.float32), axis=0)
                blk = tl.dot(a, xt) - (z + BIAS)[:, None] * cs[None, :]
            elif DIRECT == 2:  # the unpack gives q - 8 (one packed FMA per nibble pair): no correction
                blk = tl.dot(_tcasm_operand(w, xdt, ASM, BLOCK_N, SUB, True), xt)
            else:
                a = _tcasm_operand(w, xdt, ASM, BLOCK_N, SUB)
                corr = tl.full((BLOCK_N, SUB), -(BIAS + 8.0), xdt)
                blk = tl.dot(a, xt) + tl.dot(corr, xt)
            acc += blk * s[:, None]
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            for sb in tl.static_range(NSUB):
                ks = k0 + sb * SUB
                valid = ks < k_hi  # a K block of several groups may run past K
                w = tl.load(w_ptrs + (ks // 8) * stride_qk, mask=mask_nat[:, None] & valid, other=0)
                if BLOCK_N >= 16 * WARPS:  # rows in _tcasm_rows's order
                    w = tl.reshape(tl.permute(tl.reshape(w, (WARPS, 8, BLOCK_N // (16 * WARPS), 2, SUB // 8)),
                                              (2, 0, 3, 1, 4)), (BLOCK_N, SUB // 8))
                s, z = _load_group_params(s_ptr, z_ptr, offs_n, mask_n & valid, ks // GROUP, stride_sn, stride_sg,
                                          stride_zn, stride_zg, HAS_ZEROS)
                xt = tl.load(xt_ptrs + ks * stride_xk, mask=mask_m[None, :] & valid, other=0.0)
                cs = tl.sum(xt.to(tl.float32), axis=0)
                a = _tcasm_operand(w, xdt, ASM, BLOCK_N, SUB)
                blk = tl.dot(a, xt)
                acc += (blk - (z + BIAS)[:, None] * cs[None, :]) * s[:, None]
    _finish_tile(tl.trans(acc), out_ptr, part_ptr, cnt_ptr, b_ptr, pid_m * tl.num_programs(0) + pid_n, pid_k,
                 offs_m, offs_n, M, N, stride_om, stride_on, SPLIT_K, HAS_BIAS)


@triton.jit
def _splitk_reduce_kernel(part_ptr, b_ptr, out_ptr, MN, N, stride_ps, stride_om, stride_on,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * stride_ps + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offs // N) * stride_om + n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int4_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K,
                         stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg, stride_wn, stride_wk,
                         GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_w = tl.arange(0, BLOCK_K // 8)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    shifts = tl.arange(0, 8) * 4
    w = tl.load(qw_ptr + offs_n[None, :] * stride_qn + (k0 // 8 + offs_w)[:, None] * stride_qk,
                mask=mask_n[None, :], other=0)
    s, z = _load_group_params(s_ptr, z_ptr, offs_n, mask_n, k0 // GROUP, stride_sn, stride_sg,
                              stride_zn, stride_zg, HAS_ZEROS)
    q = tl.reshape((w[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
    wd = tl.trans((q.to(tl.float32) - z[None, :]) * s[None, :])
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, wd.to(w_ptr.dtype.element_ty),
             mask=mask_n[:, None])


@triton.jit
def _silu_mul_kernel(y_ptr, out_ptr, M, N, stride_ym, stride_yn, stride_om, stride_on, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """out[m, j] = silu(y[m, j]) * y[m, N + j], rounded as the unfused torch ops round: silu to out's dtype, then
    the product (the gated launches whose GEMM cannot apply it in its epilogue: one kernel instead of two)."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    rows = y_ptr + offs_m[:, None] * stride_ym
    g = tl.load(rows + offs_n[None, :] * stride_yn, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(rows + (N + offs_n)[None, :] * stride_yn, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    act = (g * tl.sigmoid(g)).to(dt).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, (act * u).to(dt), mask=mask)


# --------------------------------------------------------------------------------------------------
# Shape -> config: the one table of this family.
# --------------------------------------------------------------------------------------------------
# Measured on the H100 (examples/bench_gemm_int4.py --tune, CUDA-graph replay, K/N in {4096, 14336}, g128):
# M=2..64: the tensor-core kernel with BLOCK_M 16 (64 from M=17) and split-K 8 (4 from M=17 when N is wide).
# M=256: dequantize + cuBLAS beats the tiled kernel (119 vs 136 us at K=4096 N=14336, 42 vs 53 us at 4096^2);
# M=128 was not measured, so the crossover is put between 64 (tiled 2x faster) and 256.
# Measured on the H200 (2026-11-29, --tune at M=1 and 16, rotated many-call graph replay; gemm_int4-h200.json):
# M=1: gemv2 (128 x 4 warps, PREFETCH, split-K to ~4 programs per SM) 22.2 us at K=4096 N=14336 against
# gemv 24.2, tiled3 25.2, tiled2 29.8; 9.99 us at 4096^2 against gemv 11.9 and tiled3 10.5. M=16: tiled2 (the
# tiled kernel's tiles with the LOP3 unpack and single-pass split-K) 31.6 / 33.3 / 13.1 us against tiled
# 33.1 / 35.4 / 14.4 at the three shapes. (Both above bf16 cuBLAS's 30-32 us at M=16: see NOTES.md.)
# M=1 with bf16 x since a14fa7a: gemv2 PAIRS (packed bf16x2 word sums), symmetric --tune on the H200
# (sweeps/pairs/gemm_int4_sym-h200.json): 14.4 / 13.8 / 7.6 us at its best tiles (128 x 4 warps, split 4 / 16 / 16:
# ~450-510 programs) against the fp32 gemv2's 21.2 / 20.4 / 9.8 and bf16 cuBLAS's 30.9 / 32.3 / 13.3; end to end
# (8B bs1, same call, sweeps/pairs/llama-h200.json) the int4 decode step went 3.66 -> 2.73 ms.
# Update this one table from new --tune runs.
GEMV_MAX_M = 1
LDMMA_ENV = "KERNOPT_INT4_LDMMA"  # '0': the table never picks ldmma (A / B runs)
# gemv2 PAIRS' rows per program: 1, or several x rows against each word unpacked once (multi-row PAIRS, M 2-16)
PAIRS_ROWS = (1, 2, 4)
DEQUANT_CUBLAS_MIN_M = 192
# Implementations that read float32 x at full speed (FMA kernels convert x to fp32 anyway): the int4 pass gives
# their launches x.float() (passes/int4.py float_gemv_inputs); tcasm refuses float32 x.
FLOAT_X_IMPLS = ("gemv", "gemv2")
_SM_COUNT = 132  # H100 SXM / H200


def _split_k(tiles: int, K: int, block_k: int, wanted: int, min_k_per_split: int, max_split: int = 64) -> int:
    """Smallest power-of-two split giving `wanted` programs, keeping >= min_k_per_split of K per slice."""
    split = 1
    while tiles * split < wanted and split < max_split and K // (split * 2) >= max(block_k, min_k_per_split):
        split *= 2
    return split


# An experiment switch for the decode GEMV (M <= GEMV_MAX_M), read per call: "fp32" (gemv2's fp32 path, the table's
# pick before PAIRS; the int4 pass then hands it float32 x), or, for symmetric weights, "planes" (gemv2 one
# nibble plane at a time) or "tcasm" (the swap-AB tensor-core kernel, DIRECT=2: the unpack gives q - 8). planes and
# tcasm were faster than fp32 in isolation with bf16 x (sweeps/gemm_int4_sym-h200.json, f058872: 17.6 / 17.2 / 8.2
# and 19.0 / 18.2 / 8.6 us against 21.2 / 20.4 / 9.7) and neither takes float32 x (the int4 pass leaves their x
# alone: passes/int4.gemv_takes_float_x). The llama suite's kernopt_int4_fp32 / kernopt_int4_planes /
# kernopt_int4_tcasm systems set it, so that one run compares them with kernopt_int4 end to end. "pairs128": PAIRS
# with the 128-column tiles and ~3 programs per SM that the table picked before 2293615 (llama system
# kernopt_int4_pairs128), for the end-to-end A/B of the 64-column pick.
# "pairs64" (llama system kernopt_int4_pairs64): PAIRS with 4 warps and 64 columns, the table's pick from 2293615
# until the eighth session's A/B put 2 warps and 32 / 64 columns in its place; "px" (kernopt_int4_px): the table's
# PAIRS pick with PREFETCH_X (x's next K block loaded beside its words): with the 4-warp pick, slower end to end
# (sweeps/int4_ab/llama-h200.json: decode step 2.93 against 2.91 ms).
GEMV_VARIANT_ENV = "KERNOPT_INT4_GEMV"
GEMV_VARIANTS = ("fp32", "planes", "tcasm", "pairs128", "pairs64", "px", "split8")


def gemv_variant() -> str:
    v = os.environ.get(GEMV_VARIANT_ENV, "")
    if v and v not in GEMV_VARIANTS:
        raise ValueError(f"{GEMV_VARIANT_ENV}={v!r}; valid: '', {', '.join(map(repr, GEMV_VARIANTS))}")
    return v


# "split8" (llama system kernopt_int4_split8): the 64-column PAIRS tiles (N > 4096) as the table had them before
# 936f0f6's one-wave splits: 2 warps, split 8-16 ("px" adds PREFETCH_X to these).
# GEMV variants (gemv_variant) under which bf16 x runs PAIRS: the default and the PAIRS experiments
_PAIRS_VARIANTS = ("", "pairs128", "pairs64", "px", "split8")


# PAIRS (M=1) programs per SM by tile: (BLOCK_N, warps) -> registers per thread with zero points (offline sm_90a,
# 166bbf3; the symmetric kernel uses <= these) and what they leave room for in the 64K-register file.
_PAIRS_REGS = {(32, 2): 48, (64, 2): 96, (32, 4): 40, (64, 4): 48}


# wgr (BLOCK_N, warps, stages) -> programs per SM by registers (offline sm_90a, BLOCK_M 16, kernels/int4_wgmma.py)
_WGR_PROGRAMS_PER_SM = {(64, 4, 4): 5, (128, 4, 4): 3, (128, 8, 4): 3, (128, 4, 6): 3}


def _pairs_programs_per_sm(bn: int, warps: int) -> int:
    return min(32, 64 // warps, 65536 // (_PAIRS_REGS[(bn, warps)] * 32 * warps))


def _cdiv_split(K: int, split: int, block_k: int) -> int:
    """The split the launcher runs for a requested one: slices of whole K blocks, cdiv(K, slice) of them."""
    return cdiv(K, cdiv(cdiv(K, split), block_k) * block_k)


@functools.lru_cache(maxsize=None)  # select_config runs on every eager launch: the scan once per shape
def _fill_split(tiles: int, K: int, block_k: int, programs: int) -> int:
    """The largest split (as the launcher rounds it to whole K blocks) with tiles x split <= programs (at least 1)."""
    splits = (_cdiv_split(K, want, block_k) for want in range(1, K // block_k + 1))
    return max((s for s in splits if tiles * s <= programs), default=1)


def _pairs_split(split: int, K: int, block_k: int) -> int:
    """A PAIRS split halved until every split has >= max(BLOCK_K, 256) of K (or it is 1)."""
    while split > 1 and K // split < max(block_k, 256):
        split //= 2
    return split


def select_config(M: int, N: int, K: int, group_size: int, symmetric: bool = False,
                  x_dtype: Optional[torch.dtype] = None, wgr: bool = True, ldmma: bool = True) -> dict:
    """The config (a plain dict with "impl") for an [M, K] x int4 [N, K] product with this group size;
    symmetric: the weights have no zero points; x_dtype: x's dtype as the launch sees it (M=1 with bf16 x runs
    gemv2 PAIRS; None: not bf16); wgr / ldmma: whether those Gluon kernels may be picked (int4_gemm passes False
    where they cannot run: CPU / interpreter, or weights they do not take, see _table_wgr / _table_ldmma; and no
    ldmma for a gated one-row launch, whose SwiGLU the PAIRS GEMV fuses)."""
    block_k = min(group_size, 128)
    ldmma_cfg = _ldmma_pick(M, N, K, group_size) if ldmma and x_dtype == torch.bfloat16 and gemv_variant() == "" \
        else None
    if ldmma_cfg is not None:
        return ldmma_cfg
    if M <= GEMV_MAX_M:
        variant = gemv_variant()
        if x_dtype == torch.bfloat16 and variant in _PAIRS_VARIANTS:
            # PAIRS (bf16 x, any zero points): 32 columns x 2 warps up to N = 4096, split to >= 1536 programs but at
            # least 8 and at most 16, keeping >= 256 of K per split; 64 columns above, split to one wave (below).
            # Before 936f0f6 (KERNOPT_INT4_GEMV=split8) 64 columns took the 32-column rule too. The H200 --tune at
            # the llama decode step's four launch shapes with 2-warp / 32-column candidates (sweeps/pairs/
            # gemm_int4_sym-small_ctas-h200.json, ecd4320): K4096 N6144 8.64 us (64 x split 16), N28672 24.45 (64 x
            # 8), 4096^2 7.20 (32 x 16), K14336 N4096 13.65 (32 x 16), against 8.74 / 25.17 / 7.58 / 13.78 for the
            # 4-warp 64-column pick before ("pairs64"). End to end (sweeps/int4_ab/llama-h200.json, 3ceaa16, one
            # run): 8B int4 decode step 2.86 ms against 2.91 with "pairs64", 338.11 against 332.17 tok/s.
            # "pairs128": the pick before that, 128 columns and ~3 programs per SM (2.91 against 3.03 ms at adfb41e).
            # K4096 N14336 (the suite's shape, not a llama launch): split 16 (>= 2048 programs) took 17.61 us at
            # 9f9a1dd against 16.68 for the 4-warp split 8 (gemm_int4-h200.json); split 8 since.
            warps = 4
            if variant == "pairs128":
                bn = 128
                split = _split_k(cdiv(N, bn), K, block_k, wanted=3 * _SM_COUNT, min_k_per_split=256, max_split=16)
            else:
                bn = 64 if variant == "pairs64" or N > 4096 else 32
                if variant != "pairs64":
                    warps = 2
                if bn == 64 and variant == "":
                    # One wave: the split that keeps every program resident at once (_fill_split), 4 warps from
                    # N = 16384. ncu of the split-8 pick at K4096 N14336 (profiles/
                    # ncu-pairs-m1-k4096-n14336-166bbf3.txt): 1792 programs = 1.36 waves of the 10 per SM its 96
                    # registers allow, 22.9% achieved occupancy, DRAM 38%. H200 --tune at a36c529 (sweeps/waves):
                    # K4096 N28672 symmetric 22.55 us against 24.39 for split 8, N6144 8.53 against 8.65, N14336 with
                    # zero points 15.71 against 16.40. End to end (8B bs1, one process each, both orders:
                    # sweeps/waves_llama, waves_llama2): decode step 2.664 against 2.689 ms, 2.677 against 2.696.
                    warps = 4 if N >= 16384 else 2
                    split = _fill_split(cdiv(N, bn), K, block_k, _pairs_programs_per_sm(bn, warps) * _SM_COUNT)
                else:
                    wanted = 768 if variant == "pairs64" else 1536
                    split = _pairs_split(max(_split_k(cdiv(N, bn), K, block_k, wanted=wanted, min_k_per_split=256,
                                                      max_split=16), 8), K, block_k)
            cfg = {"impl": "gemv2", "BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": block_k, "SPLIT_K": split,
                   "PREFETCH": 1, "PAIRS": 1, "num_warps": warps, "num_stages": 1}
            if variant == "px":
                cfg["PREFETCH_X"] = 1
            return cfg
        # fp32 path (float32 / fp16 x, or the "fp32" variant): split 8 at N=14336 and 16 at N=4096 (the H200 sweep's
        # best at K=4096); at most 16. Not PLANES: with symmetric weights and bf16 x it was faster in isolation
        # (sweeps/gemm_int4_sym-h200.json: 17.6 / 17.2 / 8.2 us against 21.2 / 20.4 / 9.7), but picked for
        # symmetric weights (dd6e6ff) the int4 llama decode step went from 3.64 (adcb399) to 4.42 ms
        # (regressions/llama-h200-dd6e6ff-planes.json; HF's step moved 7.14 -> 7.81 between those runs, so ~11% of
        # it is the pick). Likely why: the pass handed the GEMV float32 x, and with float32 x PLANES' loop is the
        # longer one offline (577 against 520 SASS instructions per 128 nibbles; not timed at the kernel level).
        split = _split_k(cdiv(N, 128), K, block_k, wanted=4 * _SM_COUNT, min_k_per_split=256, max_split=16)
        cfg = {"impl": "gemv2", "BLOCK_M": 1, "BLOCK_N": 128, "BLOCK_K": block_k, "SPLIT_K": split,
               "PREFETCH": 1, "num_warps": 4, "num_stages": 1}
        if variant == "planes" and symmetric:
            cfg["PLANES"] = 1
        elif variant == "tcasm" and symmetric and group_size >= 32:
            # the symmetric sweep's best tiles: 64 rows, split 4 when N is wide (K4096 N14336), else 8
            cfg = {"impl": "tcasm", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": group_size, "SPLIT_K": 4 if N >= 8192
                   else 8, "DIRECT": 2, "num_warps": 4, "num_stages": 3}
        return cfg
    wgr_cfg = _wgr_pick(M, N, K, group_size) if wgr and x_dtype in (torch.float16, torch.bfloat16) \
        and gemv_variant() in _PAIRS_VARIANTS else None
    if wgr_cfg is not None:
        return wgr_cfg
    if M == 2 and x_dtype == torch.bfloat16 and gemv_variant() in _PAIRS_VARIANTS:
        # Two-row PAIRS (bf16 x, any zero points): each word unpacked once, then both rows' HFMA2 sums. H200 --tune
        # at c0e8a0e (sweeps/rows/gemm_int4-h200.json, weights with zero points): 32 columns x 2 warps x split 8 took
        # 22.90 / 21.96 / 9.19 us at K4096 N14336 / K14336 N4096 / 4096^2 (the best of the sweep, or within 0.6% of
        # it), against 30.64 / 32.44 / 12.98 for tiled2 (the M <= 16 row below) and bf16 cuBLAS's 30.25 / 31.62 /
        # 12.43. At M = 4 the 4-row candidates were level with tiled2 / tiled3 (32.6 / 32.0 / 12.2 against 30.4 /
        # 31.3 / 12.2 us), at M = 16 2.7-3.5x slower: the rows beyond 2 stay on the tensor-core tiles.
        return {"impl": "gemv2", "BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": block_k,
                "SPLIT_K": _pairs_split(8, K, block_k), "PREFETCH": 1, "PAIRS": 1, "num_warps": 2, "num_stages": 1}
    if M < DEQUANT_CUBLAS_MIN_M:
        if M <= 16:
            cfg = {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
            bk = block_k if K >= 8192 else min(block_k, 64)
        elif M <= 64:
            cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
            bk = min(block_k, 64)
        else:
            cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
            bk = min(block_k, 64)
        tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
        return {"impl": "tiled2" if M <= 16 else "tiled", **cfg, "BLOCK_K": bk, "GROUP_M": 8,
                "SPLIT_K": _split_k(tiles, K, bk, wanted=2 * _SM_COUNT if M > 16 else 4 * _SM_COUNT,
                                    min_k_per_split=512, max_split=8)}
    return {"impl": "dequant_cublas", "BLOCK_N": 64, "BLOCK_K": min(block_k, 128), "num_warps": 4}


def _ldmma_pick(M: int, N: int, K: int, group_size: int) -> Optional[dict]:
    """The ldmma kernel's table (kernels/int4_ldmma.py; 16-bit x), from the H200 sweeps of 2026-12-02
    (benchmarks/results/sweeps/ldmma3..6, bf16 x, group 128; us with zero points, symmetric in brackets, against the
    table before in the same runs): where it won in every run, K = 4096 (shorter K untimed: fewer chunks per warp
    to hide the first load behind) with 4096 <= N <= 16384 (one wave of 32-column programs) and M <= 8.
    - N >= 8192: 32-column programs of 4 warps (448 programs at N = 14336, all resident): K4096 N14336 M=1 / 4 / 8
      14.07 / 14.43 / 14.63 (12.47) against 15.68 / 16.01 / 16.08 (13.87) (sweeps/ldmma6; ldmma3-4 within 0.1 us).
    - N < 8192: 8 warps (128 programs at N = 4096): 4096^2 M=1 / 4 / 8 7.30-7.48 / 7.76 / 8.01 (6.55-6.64)
      against 7.68 / 9.85 / 9.95 (7.19-7.20) (sweeps/ldmma3, 4, 6).
    In one call, both tables (sweeps/ldmma_table, on / off): K4096 N14336 M=1 / 4 / 8 14.09 / 14.46 / 14.67 (12.46 /
    12.11 / 12.37) against 15.70 / 16.00 / 16.09 (13.88 / 15.32 / 15.29); 4096^2 7.42 / 7.73 / 8.03 (6.61 / 6.65 /
    7.08) against 7.69 / 9.86 / 9.93 (7.19 / 9.54 / 9.62); K4096 N6144 M=4 / 8 9.75 / 9.96 (8.88 / 9.25) against
    10.84 / 10.98 (10.53 / 10.62), but M=1 9.34 against 8.90 (8.29 / 8.52): that row stays on PAIRS.
    - K14336 N4096 (llama's down_proj): 4-way split-K (4 programs of 4 warps per 32 columns, each a contiguous K
      slice of 3584, the last to arrive summing the slots): M=1 / 4 / 8 13.71 / 14.14 / 14.99 against the table's
      16.02 / 17.24 / 17.40 in the same run (sweeps/ldmma_split, 68d93d4); unsplit it was a tie (16.06 / 17.10 /
      17.57 against 15.86 / 17.22 / 17.37). At 4096^2 the split was no faster (7.76 against 7.30 at M=1).
    Not picked: M = 9..16
    (16-row programs: 18.66 / 23.13 / 10.27 against 18.10 / 19.08 / 10.42), groups other than 128 (untimed).
    Where the time goes (sweeps/ldmma_ablate): the words' and scales' loads alone, without x, unpack or MMA,
    take 11.74 / 10.92 us at M = 1 K4096 N14336, against the 3x bar's 10.3 (a plain Triton read of the words in the
    same grid: 8.99, sweeps/read_probe). The TMA-ring form (STAGES) is slower at every M and shape (sweeps/
    ldmma_ring, ldmma_ring_ablate): never picked.
    bf16 x only (fp16 untimed), and not under a KERNOPT_INT4_GEMV experiment; KERNOPT_INT4_LDMMA=0 turns the pick
    off (A / B runs)."""
    if M > 8 or group_size != 128 or not env_switch(LDMMA_ENV, "1"):
        return None
    base = {"impl": "ldmma", "BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 128, "AHEAD": 1}
    if K == 14336 and N == 4096:
        return {**base, "SPLIT_K": 4, "num_warps": 4}
    if K != 4096 or not 4096 <= N <= 16384:
        return None
    if M == 1 and 4096 < N < 8192:  # K4096 N6144 M=1: 9.34 against PAIRS' 8.90 us with zero points (8.29 / 8.52 sym)
        return None
    return {**base, "num_warps": 4 if N >= 8192 else 8}


def _wgr_pick(M: int, N: int, K: int, group_size: int) -> Optional[dict]:
    """The wgr kernel's table (kernels/int4_wgmma.py; 16-bit x, groups >= 32), from the H200 sweeps of 2026-11-30
    (benchmarks/results/sweeps/wgr*/, bf16 x, group 128, weights with and without zero points; us at K4096 N14336 /
    K14336 N4096 / 4096^2, bf16 cuBLAS ~30.5 / 32 / 13.3 in the same runs), or None where another kernel wins:

    - M = 3..8 (and M = 2 above 4096 x 8192 weights): stream-K, scales / zeros through the TMA ring, 8 rows, 128
      columns x 4 warps, 3 stages, 4 programs per SM (sweeps/wgr5, 39ed471): M=4 16.87 / 18.10 / 10.08 with zero
      points, 15.70 / 17.12 / 9.62 without, against tiled2's 30.47 / 32.09 / 12.88. At M = 2 the two-row PAIRS
      GEMV took 22.86 / 21.95 / 9.18 (gemm_int4-h200.json, 936f0f6): wgr pads to 8 rows at the same cost as M = 4,
      so it takes M = 2 except at 4096^2.
    - M = 9..16: the same kernel with 16 rows, 4 stages, 3 programs per SM: 19.55 / 21.33 with zero points, 18.95 /
      20.26 without; at 4096^2 and below the split-K wgr (64 columns, one wave of 5 programs per SM) was faster:
      11.48 / 11.01 (sweeps/wgr3) against the stream-K's 12.5-13.5 and tiled2's 13.76.
    - M = 17..64 (sweeps/wgr_wide, 3a9f013, above 4096^2; the tiled kernel's 42.7 / 42.6 at M=32 and 45.0 / 44.0 at
      M=64 in the same run, bf16 cuBLAS 31.1 / 33.2 and 33.2 / 36.2): 32 rows x 128 columns x 3 per SM to M = 32
      (25.66 / 32.24), 64 rows x 64 columns x 2 per SM above (40.47 / 41.61). At 4096^2 the tiled kernel stays
      (16.78 / 17.83 against 16.89 / 19.35). Since the workspace slots are coalesced (sweeps/wgr_coalesced) and
      X_DOT (x permuted once per call, sweeps/wgr_xdot, wgr_xdot2): 64 rows with X_DOT and 3 programs per SM (its
      shared memory fits 3 without x^T's copy) 27.14 / 28.18 against 36.23 / 37.04 without X_DOT at 2 per SM; 32
      rows with X_DOT 21.92 / 24.31 against 22.39 / 24.68. At 4096^2 (sweeps/wgr_4096sq, --tune) wgr now wins too:
      M=64 the same 64-row X_DOT tile 15.67 against the tiled kernel's 17.70, M=32 32 rows x 64 columns x 4 per
      SM without X_DOT 12.69 against 15.81.
    M = 1 stays on the PAIRS GEMV (15.7 / 16.0 / 7.8 against wgr's 16.8 / 18.1 / 10.1)."""
    if group_size < 32 or M < 2 or M > 64:
        return None
    block_k = min(group_size, 128)
    if M > 16:
        if M > 32:
            wide = {"BLOCK_M": 64, "BLOCK_N": 64, "CTAS_PER_SM": 3, "X_DOT": 1}
        elif N * K <= 4096 * 4096:
            wide = {"BLOCK_M": 32, "BLOCK_N": 64, "CTAS_PER_SM": 4}
        else:
            wide = {"BLOCK_M": 32, "BLOCK_N": 128, "CTAS_PER_SM": 3, "X_DOT": 1}
        return {"impl": "wgr", "STREAM": 1, "PARAM_TMA": 1, **wide, "BLOCK_K": block_k, "SPLIT_K": 1, "num_warps": 4,
                "num_stages": 3}
    if M <= 8:
        if M == 2 and N * K <= 4096 * 8192:
            return None
        return {"impl": "wgr", "STREAM": 1, "PARAM_TMA": 1, "BLOCK_M": 8, "BLOCK_N": 128, "BLOCK_K": block_k,
                "SPLIT_K": 1, "CTAS_PER_SM": 4, "num_warps": 4, "num_stages": 3}
    if N * K <= 4096 * 4096:
        return {"impl": "wgr", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": block_k,
                "SPLIT_K": _fill_split(cdiv(N, 64), K, block_k, 5 * _SM_COUNT), "num_warps": 4, "num_stages": 4}
    return {"impl": "wgr", "STREAM": 1, "PARAM_TMA": 1, "BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": block_k,
            "SPLIT_K": 1, "CTAS_PER_SM": 3, "num_warps": 4, "num_stages": 4}


def candidate_configs(M: int, N: int, K: int, group_size: int) -> list[dict]:
    """Configs worth timing for this shape (the benchmark's --tune sweeps them)."""
    block_k = min(group_size, 128)
    out: list[dict] = []
    if M <= 4:
        # BLOCK_N 128 / 256 spill registers at M > 1 (offline sm_90 compile, sm90_offline.py --candidates)
        for bn in ((64, 128, 256) if M == 1 else (64,)):
            for split in (2, 4, 8, 16):
                if K // split >= block_k:
                    out.append({"impl": "gemv", "BLOCK_M": next_power_of_2(M), "BLOCK_N": bn,
                                "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": 4, "num_stages": 1})
    for bm, bn, bk, warps in ((16, 64, 64, 4), (16, 128, 64, 4), (16, 128, 128, 4), (32, 128, 64, 4),
                              (64, 128, 64, 4), (128, 128, 64, 8), (128, 256, 64, 8)):
        if bm > 16 and bm >= 2 * next_power_of_2(M):
            continue
        for split in ((1, 2, 4, 8) if M <= 64 else (1, 2)):
            if K // split >= 128:
                out.append({"impl": "tiled", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": min(block_k, bk),
                            "GROUP_M": 8, "SPLIT_K": split, "num_warps": warps, "num_stages": 3})
    if M <= 16:
        # gemv2: the prefetching single-pass GEMV; PREFETCH=0 at the gemv default's tiles isolates what
        # the prefetch adds to the unpacking / accumulation / single-pass changes.
        # Register counts from offline sm_90 compiles (K=4096, g128): M=1 BLOCK_N 128 x 4 warps 127,
        # 256 x 8 warps 160, 256 x 4 warps 243 (2 CTAs/SM), 512 x 8 warps 244; several rows spill past
        # 64 columns per 4 warps (BLOCK_M 4 x 128 x 4 warps, 16 x 64 x 4 warps), so those are left out.
        # (BLOCK_N, split, warps, PREFETCH, stages). stages > 1: the loop's loads go through shared memory by
        # cp.async, stages - 1 K blocks ahead (tl.range; offline sm_90a at M=1 K=4096: 128 x 4 warps x 4 stages
        # 123 registers and 32 KB of shared memory, 4 programs per SM with ~96 KB of words in flight per SM,
        # against 2 x 8 KB for the register double buffer; 256 x 8 warps x 3 stages 80 registers, 33 KB).
        bm = next_power_of_2(M)
        if M == 1:
            tiles = ((128, 4, 4, 1, 1), (128, 8, 4, 1, 1), (128, 16, 4, 1, 1), (128, 32, 4, 1, 1), (256, 8, 8, 1, 1),
                     (256, 16, 8, 1, 1), (256, 32, 8, 1, 1), (256, 16, 4, 1, 1), (256, 16, 4, 0, 1), (512, 8, 8, 1, 1),
                     (512, 16, 8, 1, 1),
                     (128, 8, 4, 0, 3), (128, 8, 4, 0, 4), (128, 16, 4, 0, 4), (256, 8, 8, 0, 3), (256, 16, 8, 0, 3),
                     (64, 16, 4, 0, 4))
        else:
            # Several rows on gemv2's fp32 path: 176-618 us at M = 4 on the H200 (sweeps/m4_16, 856606c), never a
            # pick; the sweeps time multi-row PAIRS there instead (above). At BLOCK_M 16 every such tile spilled.
            tiles = ()
        tiles = tuple((bn, block_k, split, warps, prefetch, stages) for bn, split, warps, prefetch, stages in tiles)
        if M == 1:
            # K blocks of 2-4 groups (zero / scale per word row): 16-32 KB of words per step per program, the
            # bytes per step of the bf16 gemv's tiles, which read 3.6 TB/s (unmeasured for int4).
            # Offline sm_90a (K4096 g128): 128 x 256 x 4 warps 243 registers with PREFETCH, 128 staged (40 KB smem
            # at 2 stages); 256 x 256 x 8 warps 246; 4-group blocks spill with PREFETCH (255 + 632 B), so staged only.
            tiles += tuple((bn, bk, split, warps, prefetch, stages)
                           for bn, bk, warps, ways in ((128, 2 * block_k, 4, ((1, 1), (0, 2), (0, 3))),
                                                       (256, 2 * block_k, 8, ((1, 1), (0, 2))),
                                                       (128, 4 * block_k, 8, ((0, 2),)), (64, 4 * block_k, 4, ((0, 2),)))
                           for prefetch, stages in ways for split in (4, 8))
        for bn, bk, split, warps, prefetch, stages in tiles:
            if K // split >= bk:
                out.append({"impl": "gemv2", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
                            "PREFETCH": prefetch, "num_warps": warps, "num_stages": stages})
        if M == 1:
            # PLANES: one nibble plane at a time on the word tile in its load layout (H200: see select_config). Offline sm_90a
            # SASS of the K loop (benchmarks/sass_loop.py) at 128 x 128 x 4 warps, per 128 nibbles per thread: 621
            # instructions against 697, 4 barriers against 16 (no shared-memory relayout of the words, no
            # broadcast of x to every thread). The H200's ncu of the gemv2 above: issue-bound at 4 warps per scheduler (47 % of issue
            # slots, 6.25 cycles per instruction, 11.3 M warp instructions for K4096 N14336).
            for bn, bk, split, warps, prefetch, stages in ((128, block_k, 8, 4, 1, 1), (128, block_k, 4, 4, 1, 1),
                                                           (128, block_k, 16, 4, 1, 1), (256, block_k, 16, 4, 1, 1),
                                                           (128, block_k, 8, 4, 0, 3), (128, 2 * block_k, 8, 4, 0, 3)):
                if K // split >= bk:
                    out.append({"impl": "gemv2", "BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
                                "PREFETCH": prefetch, "PLANES": 1, "num_warps": warps, "num_stages": stages})
        if M == 1:
            # PAIRS: packed bf16x2 word sums (word_pairs_ptx; bf16 x only on the GPU). H200 --tune at a14fa7a
            # (sweeps/pairs/gemm_int4_sym-h200.json): 128 x 4 warps best at every shape (split 4 / 16 / 16), 256 and
            # 512 columns and 8 warps slower (dropped: 256 x 8 warps, 256 x 2 blocks x 8 warps, 512). Not yet timed:
            # 64 columns (offline sm_90a: 48 registers at 4 warps, 3.5 instructions per nibble: twice the programs
            # and the warps per SM of the 128-column tile, the shape of the int4 read roofline's best, 3.46 TB/s).
            # The 64-column tiles won at 747aee5 (the table's pick since). PREFETCH=2 (two K blocks of words in
            # registers ahead of the unpack, for more bytes in flight per warp) timed slower (H200,
            # sweeps/pairs/gemm_int4_sym-prefetch2-h200.json, 9506a06: 14.99 against 13.75 us at K14336 N4096).
            # 2 warps, 32 columns and split 32: ncu of the 64-column pick (profiles/ncu-pairs-*.txt, 35d2bcf) showed
            # 0.86 waves at K14336 N4096 (2.0 TB/s) and a 2.72-wave grid with a partial tail at K4096 N28672
            # (2.49 TB/s, 48 registers: 10 CTAs per SM); smaller CTAs, more of them.
            for bn, bk, split, warps, prefetch, stages in ((128, block_k, 8, 4, 1, 1), (128, block_k, 16, 4, 1, 1),
                                                           (128, block_k, 4, 4, 1, 1), (256, block_k, 8, 4, 1, 1),
                                                           (256, block_k, 16, 8, 1, 1), (128, block_k, 8, 4, 0, 3),
                                                           (128, 2 * block_k, 8, 4, 1, 1), (128, 2 * block_k, 8, 8, 1, 1),
                                                           (64, block_k, 8, 4, 1, 1), (64, block_k, 16, 4, 1, 1),
                                                           (64, 2 * block_k, 8, 4, 1, 1), (64, block_k, 8, 2, 1, 1),
                                                           (64, block_k, 8, 4, 2, 1), (64, block_k, 16, 4, 2, 1),
                                                           (128, block_k, 8, 4, 2, 1), (64, block_k, 32, 4, 1, 1),
                                                           (64, block_k, 16, 2, 1, 1), (64, block_k, 32, 2, 1, 1),
                                                           (32, block_k, 16, 2, 1, 1), (32, block_k, 32, 2, 1, 1)):
                if K // split >= bk:
                    out.append({"impl": "gemv2", "BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
                                "PREFETCH": prefetch, "PAIRS": 1, "num_warps": warps, "num_stages": stages})
            # PREFETCH_X: x's pairs of the next K block loaded with its words (the unprefetched x loads are issued
            # just before the word sums that wait on them; ncu of the 64-column pick, profiles/ncu-pairs-*.txt:
            # ~5 of 13 cycles between a warp's instructions stalled on L1TEX). End to end with the 4-warp pick, slower
            # (sweeps/int4_ab/llama-h200.json, 3ceaa16: decode step 2.93 against 2.91 ms).
            for bn, split, warps in ((64, 8, 4), (64, 16, 4), (64, 8, 2), (64, 16, 2), (32, 16, 2)):
                if K // split >= block_k:
                    out.append({"impl": "gemv2", "BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": block_k, "SPLIT_K": split,
                                "PREFETCH": 1, "PAIRS": 1, "PREFETCH_X": 1, "num_warps": warps, "num_stages": 1})
            # Wave-filling splits: as many K slices as keep the grid within one (or two) full waves of resident
            # programs. ncu of the table's pick at K4096 N14336 (64 x 2 warps x split 8, profiles/
            # ncu-pairs-m1-k4096-n14336-166bbf3.txt): 96 registers, 10 programs per SM, a 1792-program grid = 1.36
            # waves, 22.9% achieved occupancy of 31.2%, DRAM 38%, 0.55 instructions issued per cycle per scheduler.
            for (bn, warps) in _PAIRS_REGS:
                for waves in (1, 2):
                    split = _fill_split(cdiv(N, bn), K, block_k, waves * _pairs_programs_per_sm(bn, warps) * _SM_COUNT)
                    out.append({"impl": "gemv2", "BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": block_k, "SPLIT_K": split,
                                "PREFETCH": 1, "PAIRS": 1, "num_warps": warps, "num_stages": 1})
        elif M <= 16:
            # Multi-row PAIRS (bf16 x on the GPU; select_config's M=2 pick, see there): each word unpacked into
            # bf16x2 pairs once (_unpack_pairs), then per x row the one-row loop's 4 HFMA2, lane sum, zero and scale
            # (_row_pair_acc), 2 or 4 rows per program (M > 4: several programs per weight tile), where tiled2 /
            # tiled3 (the M = 4 / 16 picks) stage dequantized tiles through shared memory for the MMA and run at ~1x
            # bf16 cuBLAS (sweeps/m4_16, 856606c).
            bm = 2 if M == 2 else 4
            for bn, split, warps in ((32, 16, 2), (64, 8, 2), (32, 8, 2), (64, 16, 4), (32, 16, 4), (64, 8, 4)):
                if bm * (block_k // 8) * bn > 64 * 32 * warps:  # the accumulators: <= 64 fp32 per thread
                    continue
                if K // split >= max(block_k, 256):
                    out.append({"impl": "gemv2", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": block_k, "SPLIT_K": split,
                                "PREFETCH": 1, "PAIRS": 1, "num_warps": warps, "num_stages": 1})
        # tiled2: the tiled kernel's tiles with the LOP3 unpack and the single-pass split-K.
        for bn, bk, warps in ((64, 64, 4), (128, 64, 4), (128, 128, 4), (256, 64, 8)):
            for split in (2, 4, 8, 16):
                if K // split >= 128:
                    out.append({"impl": "tiled2", "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": min(block_k, bk),
                                "GROUP_M": 8, "SPLIT_K": split, "num_warps": warps, "num_stages": 3})
        # tiled3: the swap-AB tensor-core kernel (weight planes as wgmma's register operand); its dots need
        # BLOCK_K / 8 >= 16, so group sizes >= 128. BLOCK_M is 16 whatever M (the dot's smallest N).
        if block_k >= 128:
            for bn, warps, stages in ((64, 4, 3), (128, 4, 3), (128, 4, 4), (256, 8, 3)):
                for split in (2, 4, 8):
                    if K // split >= 128:
                        out.append({"impl": "tiled3", "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": split,
                                    "num_warps": warps, "num_stages": stages})
        # tcasm: swap-AB wgmma, the weight unpacked two nibbles per 32-bit instruction straight into the register
        # operand (K order permuted to the fragment's); slower than gemv2 on the H200, so select_config never
        # picks it. BLOCK_M 16: at 8 Triton falls back to mma.sync with shared-memory round trips (offline sm_90a: 4.0 instr/nibble).
        # BLOCK_K = one or two groups (a dot per group), >= 32 (the permutation works on 32-column chunks).
        if group_size >= 32:
            for bn, warps in ((64, 4), (128, 4), (256, 8)):
                for bk in sorted({min(group_size, 128), min(2 * group_size, 256)}):
                    for split in (4, 8, 16):
                        if K // split >= bk:
                            out.append({"impl": "tcasm", "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk,
                                        "SPLIT_K": split, "num_warps": warps, "num_stages": 3})
                # DIRECT: one group per iteration (BLOCK_K = group), words loaded in the dot's row order, the next
                # group's x / scales prefetched, the symmetric zero by a second dot (1) or in the unpack (2).
                for direct in (1, 2):
                    for split in (4, 8, 16):
                        if K // split >= group_size:
                            out.append({"impl": "tcasm", "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": group_size,
                                        "SPLIT_K": split, "DIRECT": direct, "num_warps": warps, "num_stages": 3})
        # wgr (kernels/int4_wgmma.py, Gluon): swap-AB wgmma with the words TMA'd into a ring and unpacked straight
        # into the register operand; a step is min(group, 128) of K, groups >= 32. Splits fill one or two waves of
        # the programs per SM its registers allow (offline sm_90a at BLOCK_M 16: 64 x 4 warps 95 registers, 128 x
        # 4 warps 163, 128 x 8 warps 79; 24-41 KB of shared memory at 4 stages).
        if group_size >= 32:
            bm_w = 8 if M <= 8 else 16
            for (bn, warps, stages), per_sm in _WGR_PROGRAMS_PER_SM.items():
                for waves in ((1, 2) if stages == 4 else (1,)):
                    split = _fill_split(cdiv(N, bn) * cdiv(M, bm_w), K, block_k, waves * per_sm * _SM_COUNT)
                    out.append({"impl": "wgr", "BLOCK_M": bm_w, "BLOCK_N": bn, "BLOCK_K": block_k, "SPLIT_K": split,
                                "num_warps": warps, "num_stages": stages})
            # STREAM: one persistent program per resident slot (CTAS_PER_SM x SMs), each a contiguous run of the
            # (tile, K step) sequence (stream-K), x tiles through the TMA ring beside the words. Why: ncu of the
            # split-K kernel (M=16 K4096 N14336, 128 x 4 warps x split 3, ffbd0eb): SMs active 75 % of the elapsed
            # cycles (336 programs over 396 slots: 2 or 3 per SM), 37 % of stalls on global loads (x, scales); and
            # in the sweep fewer, longer programs won (per-program fill and split-K tail).
            # PARAM_TMA: scales / zeros through the ring as well (else register loads two steps ahead).
            for bn, warps, stages, per_sm, param_tma in ((128, 4, 4, 3, 0), (128, 4, 4, 3, 1), (128, 4, 3, 4, 1),
                                                         (64, 4, 4, 5, 0), (64, 4, 6, 4, 1), (128, 8, 4, 2, 0)):
                out.append({"impl": "wgr", "STREAM": 1, "PARAM_TMA": param_tma, "BLOCK_M": bm_w, "BLOCK_N": bn,
                            "BLOCK_K": block_k, "SPLIT_K": 1, "CTAS_PER_SM": per_sm, "num_warps": warps,
                            "num_stages": stages})
            # WS: the same stream-K kernel with a one-warp TMA producer (PARAM_TMA's ring) and the warpgroup as
            # consumer, released slot by slot through empty mbarriers: none of the CTA-wide barriers Gluon places
            # around each TMA issue (6 bar.sync a step at PARAM_TMA, offline) on the consumers' path.
            for stages, per_sm in ((4, 3), (3, 4), (5, 3)):
                out.append({"impl": "wgr", "STREAM": 1, "WS": 1, "BLOCK_M": bm_w, "BLOCK_N": 128, "BLOCK_K": block_k,
                            "SPLIT_K": 1, "CTAS_PER_SM": per_sm, "num_warps": 4, "num_stages": stages})
    if 16 < M <= 64 and group_size >= 32:
        # wgr with 32 / 64 rows (wgmma N = BLOCK_M): the weights are unpacked once for all the rows, where the tiled
        # kernel (the M = 64 pick) stores dequantized tiles to shared memory. Offline sm_90a, 128 columns x 4 warps x 3
        # stages: 143 registers / 67 KB at 32 rows, 218 / 108 KB at 64; 64 columns: 80 / 54 KB, 117 / 95 KB.
        bm_w = 32 if M <= 32 else 64
        for bn, per_sm in ((128, 3 if bm_w == 32 else 2), (64, 4 if bm_w == 32 else 2)):
            out.append({"impl": "wgr", "STREAM": 1, "PARAM_TMA": 1, "BLOCK_M": bm_w, "BLOCK_N": bn,
                        "BLOCK_K": block_k, "SPLIT_K": 1, "CTAS_PER_SM": per_sm, "num_warps": 4, "num_stages": 3})
        # X_DOT: x permuted once per call, the ring's x tile the wgmma's operand (no relabelled copy: 33 KB less
        # shared memory at 64 rows x 64 columns, room for a third program per SM)
        for bn, per_sm in ((128, 3), (64, 3), (64, 4)):
            out.append({"impl": "wgr", "STREAM": 1, "PARAM_TMA": 1, "X_DOT": 1, "BLOCK_M": bm_w, "BLOCK_N": bn,
                        "BLOCK_K": block_k, "SPLIT_K": 1, "CTAS_PER_SM": per_sm, "num_warps": 4, "num_stages": 3})
    if M == 1 and 32 <= group_size <= 2048:
        # tgemv (kernels/int4_tgemv.py, Gluon; bf16 x): a program per 32-word column strip over all of K, words /
        # scales / zeros by TMA into a ring of ROWS word rows a step; no split-K. Slower than PAIRS everywhere on the
        # H200 (sweeps/tgemv1..3): never the table's pick; these are the first sweep's best tiles per shape.
        for rows, stages, warps in ((64, 4, 4), (128, 3, 4), (128, 3, 8), (256, 2, 8)):
            cfg = {"impl": "tgemv", "BLOCK_N": 32, "ROWS": rows, "num_warps": warps, "num_stages": stages}
            if strip_warps(tgemv_geometry(K, group_size, cfg)[0], group_size // 8, 32, warps):
                out.append(cfg)
    if M <= 16 and group_size % 32 == 0:
        # ldmma (kernels/int4_ldmma.py, Gluon; 16-bit x): words by plain loads into mma.sync's registers, a program
        # per 32 columns over all of K, its warps taking K chunks round robin (more warps: more loads in flight)
        # (sweeps/ldmma2: 2-3 chunks in flight per warp, before the loop was unrolled, were slower than one,
        # 17.97 / 20.73 against 14.10 us; BLOCK_N 64 slower everywhere, sweeps/ldmma2-3). AHEAD 2: two chunks in
        # flight per warp; MAXNREG 128: four 4-warp programs per SM at 16 rows (168 registers otherwise, no spill).
        # Chunks of 64 with one ahead (126 registers at 16 rows) beat none of these at M = 9 / 16 (sweeps/ldmma_m16,
        # ldmma_m16_sym: K4096 N14336 M=16 18.92 against the table's 18.24 us): not listed
        bm = 8 if M <= 8 else 16
        for warps, bk, ahead in ((4, 128, 1), (4, 128, 2), (4, 64, 2), (8, 128, 1), (8, 128, 2), (8, 64, 2),
                                 (16, 128, 1), (16, 64, 2)):
            out.append({"impl": "ldmma", "BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": min(bk, group_size),
                        "AHEAD": ahead, "num_warps": warps})
        if bm == 16:
            out.append({"impl": "ldmma", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": min(128, group_size), "AHEAD": 1,
                        "MAXNREG": 128, "num_warps": 4})
        # the words by TMA into a shared-memory ring (STAGES slots of one step's chunks; bytes in flight cost no
        # registers), read back with the conflict-free word-row order (ROWS 1, chunks of 64 or more). Slower than
        # the register loads at every M and shape on the H200 (sweeps/ldmma_ring, ldmma_ring_ablate: M=1 K4096 N14336
        # 16.00 against 14.10 us, M=4 16.91 against 14.41, K14336 N4096 M=4 20.64 against 17.23): the two best kept
        for warps, stages in ((4, 3), (8, 3)):
            bk = min(128, group_size)
            if warps * bk // 8 <= 256:
                out.append({"impl": "ldmma", "BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": bk, "STAGES": stages,
                            "ROWS": int(bk >= 64), "num_warps": warps})
        # split-K (SPLIT_K programs per 32 columns, the last to arrive sums their slots) where N / 32 programs leave
        # SMs idle: plain reads of the words in the unsplit grid take 12.3 us at K14336 N4096 and 5.2 at 4096^2,
        # 4-way split 9.0 / 4.2 (sweeps/read_probe). Timed (sweeps/ldmma_split): 4 warps x split 4 the fastest at
        # K14336 N4096 M <= 8 (13.71 against the unsplit table's 16.02 us at M=1), no gain at 4096^2.
        # Not at N > 8192: a 2-way split at K4096 N14336 (896 programs, 4 per SM by registers) took 16.33 / 25.13 us
        # (4 / 8 warps) against the unsplit pick's 14.13 at M=1 (sweeps/ldmma_split2).
        if N <= 8192:
            for warps, split in ((4, 2), (4, 4), (8, 2), (8, 4)):
                out.append({"impl": "ldmma", "BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": min(128, group_size),
                            "AHEAD": 1, "SPLIT_K": split, "num_warps": warps})
        # 16-column programs (2 columns a lane): twice the programs, for more warps per SM (sweeps/ldmma_ablate:
        # the words' loads alone took 11.74 us at K4096 N14336 with 32-column programs of 4 warps, 3.4 per SM)
        for warps, ahead in ((4, 1), (4, 2), (8, 1), (8, 2)):
            out.append({"impl": "ldmma", "BLOCK_M": bm, "BLOCK_N": 16, "BLOCK_K": min(128, group_size),
                        "AHEAD": ahead, "num_warps": warps})
    out.append({"impl": "dequant_cublas", "BLOCK_N": 64, "BLOCK_K": block_k, "num_warps": 4})
    # the wave-filling splits can repeat a listed tile: time each config once
    return list({tuple(sorted(c.items())): c for c in out}.values())


def format_config(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
           group_size: int, bias: Optional[torch.Tensor]) -> tuple[int, int, int]:
    if x.dim() != 2:
        raise ValueError(f"int4_gemm: x must be [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"int4_gemm: x must be float16, bfloat16 or float32, got {x.dtype}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"int4_gemm: qweight must be int32 [N, K // 8], got {qweight.dtype} {tuple(qweight.shape)}")
    M, K = x.shape
    N = qweight.shape[0]
    if group_size < 16 or group_size & (group_size - 1) or K % group_size:
        raise ValueError(f"int4_gemm: group_size must be a power of two >= 16 dividing K={K}, got {group_size}")
    if qweight.shape[1] * 8 != K:
        raise ValueError(f"int4_gemm: qweight {tuple(qweight.shape)} does not hold K={K} nibbles per row")
    if tuple(scales.shape) != (N, K // group_size):
        raise ValueError(f"int4_gemm: scales must be [N, K // group_size] = {(N, K // group_size)}, "
                         f"got {tuple(scales.shape)}")
    if zeros is not None and tuple(zeros.shape) != (N, K // group_size):
        raise ValueError(f"int4_gemm: zeros must be [N, K // group_size] = {(N, K // group_size)} or None, "
                         f"got {tuple(zeros.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"int4_gemm: bias must be [N] = ({N},), got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"int4_gemm: {name} is on {t.device}, x on {x.device}")
    return M, N, K


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int,
                    dtype: torch.dtype = torch.bfloat16, config: Optional[dict] = None,
                    wrap=None) -> torch.Tensor:
    """The [N, K] weight in `dtype`, dequantized by a Triton kernel (the first half of dequant_cublas). wrap: what
    the kernel goes through before its launch (kernopt.ops.int4_weight passes torch.library.wrap_triton)."""
    N, K = qweight.shape[0], qweight.shape[1] * 8
    cfg = {"BLOCK_N": 64, "BLOCK_K": min(group_size, 128), "num_warps": 4, **(config or {})}
    block_k = min(cfg["BLOCK_K"], group_size)
    w = torch.empty((N, K), dtype=dtype, device=qweight.device)
    z = zeros if zeros is not None else scales
    grid = (cdiv(N, cfg["BLOCK_N"]), K // block_k)
    (wrap(_int4_dequant_kernel) if wrap is not None else _int4_dequant_kernel)[grid](
        qweight, scales, z, w, N, K,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), z.stride(0), z.stride(1),
        w.stride(0), w.stride(1),
        GROUP=group_size, HAS_ZEROS=zeros is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        num_warps=cfg.get("num_warps", 4))
    return w


def silu_mul(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Llama's SwiGLU over a gated product y [M, 2n] (gate columns, then up): silu(y[:, :n]) * y[:, n:] into out
    [M, n] (any strides), by one Triton kernel; the values are the two torch ops' (each rounded to out's dtype)."""
    M, n = out.shape
    if M and n:
        bm, bn = 4, 256
        _silu_mul_kernel[(cdiv(n, bn), cdiv(M, bm))](y, out, M, n, y.stride(0), y.stride(1), out.stride(0),
                                                     out.stride(1), BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return out


def dequant_cublas(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                   group_size: int, bias: Optional[torch.Tensor], cfg: dict, out: Optional[torch.Tensor] = None,
                   gated: bool = False) -> torch.Tensor:
    """The dequant_cublas launch without int4_gemm's operand checks: the dequantized weight's kernel, then cuBLAS
    straight into `out` (gated: into a [M, N] product, then `silu_mul` into out [M, N / 2]).

    For operands int4_gemm has accepted (kernopt.ops calls it directly for a signature it has seen go through
    int4_gemm: the prompt's host-bound forward pays int4_gemm's Python per launch,
    benchmarks/op_host_overhead.py)."""
    M, N = x.shape[0], qweight.shape[0]
    if out is None:
        out = torch.empty((M, N // 2 if gated else N), dtype=x.dtype, device=x.device)
    w = int4_dequantize(qweight, scales, zeros, group_size, x.dtype, cfg)
    # straight into the output (F.linear then a copy cost a device copy of the output per call: 1 of 13.5 ms of the
    # 1B prompt's kernels, profiles/profile-1B-kernopt_int4-forward-aeb391d.txt); F.linear's own mm / addmm
    wt = w.t()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if gated else out
    y = torch.mm(x, wt, out=y) if bias is None else torch.addmm(bias, x, wt, out=y)
    return silu_mul(y, out) if gated else y


def resolve_config(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                   group_size: int, config: Optional[dict], gated: bool = False) -> dict:
    """The config int4_gemm launches with: a copy of `config`, else the table's (select_config) for these
    operands (gated: a SwiGLU launch, which keeps the PAIRS GEMV's fused epilogue at one row)."""
    if config is not None:
        return dict(config)
    M, K = x.shape
    return select_config(M, qweight.shape[0], K, group_size, symmetric=zeros is None and x.dtype != torch.float32,
                         x_dtype=x.dtype, wgr=_table_wgr(x, qweight, scales, zeros, group_size),
                         ldmma=_table_ldmma(x, qweight, group_size) and not (gated and M == 1))


IMPLS = ("gemv", "tiled", "gemv2", "tiled2", "tiled3", "tcasm", "wgr", "tgemv", "ldmma", "dequant_cublas")

# Arrival counters of the single-pass split-K kernels: kernels/workspace.py (one zeroed buffer per device,
# reserved outside CUDA-graph captures).


def _launch_single_pass(impl, cfg, x, qweight, scales, z, b, out, M, N, K, group_size, split, k_per_split,
                        has_zeros, has_bias, gated=False):
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    tiles = cdiv(M, bm) * cdiv(N, bn)
    counters = arrival_counters(x.device, tiles) if split > 1 else None
    if impl == "wgr":  # kernels/int4_wgmma.py (Gluon), which lays out its own partial sums
        int4_wgr_gemm(x, qweight, scales, z, b, out, M, N, K, group_size, split, k_per_split, has_zeros, has_bias,
                      cfg, counters)
        return out
    if split > 1:
        part = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    else:
        part, counters = out, out  # never touched with SPLIT_K=1
    args = (x, qweight, scales, z, b, out, part, counters, M, N, K, k_per_split, 0,
            x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
            z.stride(0), z.stride(1), out.stride(0), out.stride(1))
    common = dict(GROUP=group_size, HAS_ZEROS=has_zeros, HAS_BIAS=has_bias, SPLIT_K=split, BLOCK_M=bm,
                  BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], num_warps=cfg.get("num_warps", 4),
                  num_stages=cfg.get("num_stages", 1 if impl == "gemv2" else 3))
    if impl == "gemv2":
        grid = (cdiv(N // 2, bn // 2), split, 1) if gated else (cdiv(N, bn), split, cdiv(M, bm))
        planes, pairs = bool(cfg.get("PLANES", 0)), bool(cfg.get("PAIRS", 0))
        if planes and bm != 1:
            raise ValueError(f"int4_gemm: gemv2 PLANES=1 needs BLOCK_M=1, got {bm}")
        if pairs and bm not in PAIRS_ROWS:
            raise ValueError(f"int4_gemm: gemv2 PAIRS=1 takes BLOCK_M in {PAIRS_ROWS}, got {bm}")
        if pairs and bm > 1 and (gated or cfg.get("PREFETCH_X")):
            raise ValueError("int4_gemm: gemv2 PAIRS=1 with BLOCK_M > 1 has no gated epilogue or PREFETCH_X")
        if planes and pairs:
            raise ValueError("int4_gemm: gemv2 takes PLANES=1 or PAIRS=1, not both")
        prefetch_x = bool(cfg.get("PREFETCH_X", 0))
        if prefetch_x and not (pairs and int(cfg.get("PREFETCH", 1)) == 1):
            raise ValueError("int4_gemm: gemv2 PREFETCH_X=1 needs PAIRS=1 and PREFETCH=1")
        asm = pairs and x.is_cuda
        if asm:
            if x.dtype != torch.bfloat16:
                # fp16 pairs would overflow (sums of x (q - 8) past 65504 once |x| > ~2000); float32 would round x
                raise ValueError(f"int4_gemm: gemv2 PAIRS=1 takes bfloat16 x on the GPU, got {x.dtype}")
            if x.stride(1) != 1 or (M > 1 and x.stride(0) % 2) or x.data_ptr() % 4:
                x = torch.empty((M, K), dtype=x.dtype, device=x.device).copy_(x)  # fresh: aligned, contiguous
                args = (x,) + args[1:13] + (x.stride(0), x.stride(1)) + args[15:]
        pdl = use_pdl(x)
        _int4_gemv2_kernel[grid](*args, PREFETCH=int(cfg.get("PREFETCH", 1)), LOAD_STAGES=common["num_stages"],
                                 PLANES=planes, PAIRS=pairs, ASM=asm, PREFETCH_X=prefetch_x, GATED=gated,
                                 N_OUT=N // 2, PDL=pdl, **common, **launch_kwargs(pdl))
    elif impl == "tcasm":
        _int4_tcasm_kernel[(cdiv(N, bn), split, cdiv(M, bm))](*args, ASM=x.is_cuda, WARPS=common["num_warps"],
                                                               DIRECT=int(cfg.get("DIRECT", 0)), **common)
    elif impl == "tiled3":
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        _int4_tiled3_kernel[(cdiv(N, bn), split, cdiv(M, bm))](*args, DOT_PRECISION=precision,
                                                                             **common)
    else:
        grid = (tiles, split)
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        _int4_tiled2_kernel[grid](*args, GROUP_M=cfg.get("GROUP_M", 8), DOT_PRECISION=precision, **common)
    return out


def _table_wgr(x, qweight, scales, zeros, group_size) -> bool:
    """Whether the table may pick wgr for these operands: a CUDA launch (Gluon has no interpreter), weights the
    kernel takes (wgr_supported), and scales / zeros whose rows TMA can read as they are (else a per-call copy:
    the Triton kernels are cheaper than that)."""
    if not x.is_cuda or wgr_supported(x, qweight, group_size) is not None:
        return False
    return all(t is None or tma_rows_ok(t) for t in (scales, zeros))


def _table_ldmma(x, qweight, group_size) -> bool:
    """Whether the table may pick ldmma for these operands: a CUDA launch (Gluon has no interpreter) of weights the
    kernel takes (ldmma_supported)."""
    return x.is_cuda and ldmma_supported(x, qweight, group_size) is None


def _gluon_refusal(impl: str, why: Optional[str], x: torch.Tensor) -> None:
    """A clear error for a Gluon kernel's launch it cannot take: `why` (its *_supported check), or a CPU launch
    under Triton's interpreter, which does not run Gluon."""
    if why is None and not x.is_cuda and interpreting():
        why = "a Gluon kernel, which Triton's interpreter does not run"
    if why:
        raise ValueError(f"int4_gemm: impl {impl!r}: {why}")


def gated_epilogue(cfg: dict, M: int) -> bool:
    """Whether int4_gemm(gated=True) with this config applies the SwiGLU in the kernel's epilogue (gemv2 at one row),
    rather than after the product in torch."""
    return cfg.get("impl") == "gemv2" and cfg.get("BLOCK_M") == 1 and M == 1


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
              group_size: int, bias: Optional[torch.Tensor] = None, config: Optional[dict] = None,
              out: Optional[torch.Tensor] = None, gated: bool = False) -> torch.Tensor:
    """x [M, K] fp16/bf16 (fp32 accepted) times the int4 weight [N, K] (format in the module docstring)
    -> [M, N] in x's dtype. `out=` may be a preallocated [M, N] tensor; `config=` overrides select_config.

    gated: Llama's SwiGLU over the product, ``silu(y[:, :N/2]) * y[:, N/2:]`` -> [M, N/2] (the weight's rows are the
    gate projection's then the up projection's, as `kernopt.int4.pack_adjacent` stores them), each step rounded to
    x's dtype as the unfused ops round. With gemv2 at one row (M = 1, BLOCK_M = 1) in the GEMV's epilogue: no [M, N]
    output and no second kernel; any other config runs the product, then `silu_mul` (one kernel)."""
    M, N, K = _check(x, qweight, scales, zeros, group_size, bias)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the Gluon kernels (wgr, ldmma) read bias[n] at b + n
    if gated and N % 2:
        raise ValueError(f"int4_gemm: gated needs an even N (gate rows then up rows), got N={N}")
    n_out = N // 2 if gated else N
    if out is None:
        out = torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (M, n_out) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"int4_gemm: out must be [M, N{' / 2' if gated else ''}] = {(M, n_out)} {x.dtype} on "
                         f"{x.device}, got {tuple(out.shape)} {out.dtype} {out.device}")
    if M == 0 or N == 0:
        return out
    # (the GEMV experiment's kernels read 16-bit x only: a float32 x keeps the table's GEMV)
    cfg = resolve_config(x, qweight, scales, zeros, group_size, config, gated)
    impl = cfg.get("impl")
    if impl == "dequant_cublas":
        return dequant_cublas(x, qweight, scales, zeros, group_size, bias, cfg, out, gated)
    in_kernel = gated and gated_epilogue(cfg, M)
    if gated and not in_kernel:
        return silu_mul(int4_gemm(x, qweight, scales, zeros, group_size, bias, cfg), out)
    if impl not in IMPLS:
        raise ValueError(f"int4_gemm: unknown impl {impl!r}; valid: {', '.join(map(repr, IMPLS))}")
    if impl == "tgemv":  # kernels/int4_tgemv.py (Gluon): whole-K column strips fed by TMA, one row of bf16 x
        _gluon_refusal(impl, tgemv_supported(x, qweight, scales, zeros, group_size), x)
        return int4_tgemv(x, qweight, scales, zeros, bias, out, group_size, cfg)
    if impl == "ldmma":  # kernels/int4_ldmma.py (Gluon): words loaded into mma.sync's registers, whole K per program
        _gluon_refusal(impl, ldmma_supported(x, qweight, group_size), x)
        return int4_ldmma(x, qweight, scales, zeros, bias, out, group_size, cfg)

    block_k = cfg["BLOCK_K"]
    # gemv2 at BLOCK_M 1 (or with PAIRS) also takes K blocks of several whole groups (zero and scale per word row)
    multi_ok = ((impl == "gemv2" and (cfg.get("BLOCK_M") == 1 or cfg.get("PAIRS"))) or impl == "tcasm") \
        and block_k % group_size == 0
    if block_k < 8 or block_k & (block_k - 1) or (group_size % block_k and not multi_ok):
        raise ValueError(f"int4_gemm: BLOCK_K={block_k} must be a power of two >= 8 dividing group_size={group_size}"
                         " (or, for tcasm and for gemv2 at BLOCK_M=1 or with PAIRS, a multiple of it)")
    if impl == "tcasm" and min(block_k, group_size) < 32:
        raise ValueError(f"int4_gemm: tcasm dots span 32-column chunks: min(BLOCK_K, group_size) must be >= 32, "
                         f"got BLOCK_K={block_k} group_size={group_size}")
    split = max(1, int(cfg.get("SPLIT_K", 1)))
    k_per_split = cdiv(cdiv(K, split), block_k) * block_k
    split = cdiv(K, k_per_split)
    z = zeros if zeros is not None else scales  # a valid pointer that HAS_ZEROS=False never reads
    b = bias if bias is not None else scales
    if impl == "tiled3" and x.is_cuda and (block_k < 128 or cfg["BLOCK_M"] < 16):
        raise ValueError(f"int4_gemm: tiled3 needs BLOCK_K >= 128 and BLOCK_M >= 16 on the GPU (dots of K = "
                         f"BLOCK_K / 8 >= 16), got BLOCK_K={block_k} BLOCK_M={cfg['BLOCK_M']}")
    if impl == "tcasm" and x.dtype == torch.float32:
        # The dot's operands are 16-bit (B + q and x); x in bf16 would round an fp32 x (float32 tolerance fails),
        # an exact 3-way bf16 split of x is possible but unbuilt (see the kernel's docstring).
        raise ValueError("int4_gemm: tcasm takes float16/bfloat16 x only, got float32 (use gemv2 for float32 x)")
    if impl == "wgr" and config is not None:  # (the table offers wgr only where _table_wgr checked this)
        _gluon_refusal(impl, wgr_supported(x, qweight, group_size), x)
    if impl in ("gemv2", "tiled2", "tiled3", "tcasm", "wgr"):
        return _launch_single_pass(impl, cfg, x, qweight, scales, z, b, out, M, N, K, group_size, split,
                                   k_per_split, zeros is not None, bias is not None, gated=in_kernel)
    if split == 1:
        dst, stride_s = out, 0
    else:
        dst = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
        stride_s = dst.stride(0)
    common = dict(GROUP=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, SPLIT_K=split,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
                  num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    args = (x, qweight, scales, z, b, dst, M, N, K, k_per_split,
            x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
            z.stride(0), z.stride(1), stride_s, dst.stride(-2), dst.stride(-1))
    if impl == "gemv":
        grid = (cdiv(N, cfg["BLOCK_N"]), split, cdiv(M, cfg["BLOCK_M"]))
        _int4_gemv_kernel[grid](*args, **common)
    else:
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), split)
        # fp32 activations (CPU / debugging) get full-precision dots, never silent TF32.
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        _int4_tiled_kernel[grid](*args, GROUP_M=cfg.get("GROUP_M", 8), DOT_PRECISION=precision, **common)
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(cdiv(M * N, block),)](
            dst, b, out, M * N, N, dst.stride(0), out.stride(0), out.stride(1),
            SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out


# --------------------------------------------------------------------------------------------------
# Reference (plain torch): what Int4Linear runs eagerly and what the int4 pass recognises.
# --------------------------------------------------------------------------------------------------
def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, K // 8] words -> int32 [N, K] codes in [0, 15] (nibble i of word j is k = 8j + i)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    q = torch.bitwise_and(torch.bitwise_right_shift(qweight.unsqueeze(-1), shifts), 0xF)
    return q.reshape(qweight.shape[0], -1)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """[N, K] weight in `dtype`: (q - zero) * scale per group, in fp32, rounded once to `dtype`."""
    q = unpack_int4(qweight)
    N, K = q.shape
    q = q.reshape(N, K // group_size, group_size).float()
    z = zeros.float().unsqueeze(-1) if zeros is not None else 8.0
    w = (q - z) * scales.float().unsqueeze(-1)
    return w.reshape(N, K).to(dtype)


def int4_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                  group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(x, dequantize_int4(qweight, scales, zeros, group_size, x.dtype), bias)
