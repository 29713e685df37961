"""INT4 weight-only GEMM for small M on Hopper, written in Gluon: ``wgr`` (wgmma with the weight in registers).

y[M, N] = x[M, K] @ dequant(qweight, scales, zeros)[N, K].T (+ bias), kernopt's int4 format (kernels/int4_gemm.py:
N-contiguous int32 words, nibble i of word j is k = 8 j + i), BLOCK_M (8, 16, 32 or 64) rows of x per tile. int4_gemm's
table picks it at M = 2..64 with 16-bit x and groups >= 32 (`int4_gemm._wgr_pick`); M = 1 stays on the PAIRS
GEMV.

Why Gluon: the Triton tensor-core int4 kernels (tiled2 / tiled3 / tcasm in int4_gemm.py) all ran at ~1x bf16
cuBLAS at M = 4..16 on the H200, whatever their SASS count, because the compiler chose their data movement:
dequantized tiles stored to shared memory for the MMA (tiled2), words relaid out through shared memory and x^T
loaded unpipelined with a barrier and a wgmma wait per group (tcasm). Gluon states the layouts and the
pipeline, so this kernel has the data path of a Marlin-style kernel:

- **Swap-AB.** The product is out^T [BLOCK_N, BLOCK_M] = W [BLOCK_N, K] @ x^T [K, BLOCK_M]: the weight is wgmma's
  A operand, which sm_90 reads from registers, and the few rows of x are its N (8 or 16).
- **Words by TMA into a STAGES-deep shared-memory ring** (an mbarrier per slot): bytes in flight cost no registers.
- **Words from shared memory straight into the A fragment.** The word tile is read in a linear layout in which
  lane t of warp w holds rows 16 w + t // 4 (and + 8) and words j = t % 4 + 4 c: whole words per lane. It is
  read in the orientation TMA stored it ([KS / 8, BLOCK_N]) and permuted in registers: a load through a permuted
  shared-memory view returned the tile unpermuted on the H200 (benchmarks/wgr_probe.py, sweeps/wgr_probe).
  ``lop3 (w >> 4 i) & 0x000F000F | B2`` makes nibbles i and i + 4 one 32-bit pair of 16-bit floats (B + q, exact:
  B = 128 in bf16, 1024 in fp16) and a packed subtraction centres it to q - z: (B + 8) for symmetric weights
  (exact), or B then z for zero points (one rounding of q - z, as the reference rounds (q - z) s). The pairs are
  joined and reshaped into [BLOCK_N, KS], whose layout *is* wgmma's register-operand layout (the conversion is
  asserted trivial at compile time): no shuffle, no shared-memory round trip. The dot's fp32 result is scaled
  per row (one group per step) into the accumulator.
- **The K order is permuted, not the weights.** Position p = 32 c + 16 s + 8 h + 2 l + e of a step's dot holds
  nibble i = 2 s + h + 4 e of word 4 c + l, i.e. k = 32 c + 8 l + 2 s + h + 4 e (`wgr_k_order`; A_PERM / X_PERM).
  x is read in natural order and relabelled in registers into that order before its store to the wgmma's shared
  operand; the sum over k does not care. ``X_DOT`` (the table's pick at 17-64 rows): x is permuted into that order
  once per call instead (`wgr_x_dot`, one Triton launch of 1.5-2 us), and the ring's x tile is the operand as TMA
  lands it: at 64 rows the relabelled copy cost 9 of 37 us (sweeps/wgr_wide_ablate); at 2-16 rows it costs 0.4-0.9
  us, less than the extra launch.

One step is KS = min(group, 128) of K: [KS / 8, BLOCK_N] words, one x^T tile, one dot, one scale. Three ways to
spread the steps over programs (int4_gemm config keys):

- split-K (``_int4_wgr_kernel``): a program per (column tile, K slice), single-pass split-K as the Triton kernels
  (fp32 partials, an arrival counter, the last slice sums them in slice order); x, scales, zeros by register loads
  one step ahead. The table's pick at 16 rows on 4096^2 (11.41 us, 1.17x bf16 cuBLAS).
- ``STREAM`` (``_int4_wgr_sk_kernel``): one persistent program per resident slot (CTAS_PER_SM), each a contiguous
  run of the (tile, step) sequence (stream-K), x tiles TMA'd through the ring with the words, a tile's partial
  sums from its programs summed in program order by the last to arrive (`sk_partition`). ``PARAM_TMA``: scales and
  zeros through the ring too; without it, register loads two steps ahead. The table's pick elsewhere.
- ``STREAM`` + ``WS`` (``_int4_wgr_ws_kernel``): the same, warp-specialised: a one-warp TMA producer and the
  warpgroup as consumer (ready / empty mbarriers per slot), with maxnreg set so that CTAS_PER_SM programs fit.

Partial sums (split-K and stream-K alike) go to workspace slots in the accumulator's register order
(`_slot_offsets`), so that one warp's store or load of a register pair is 256 contiguous bytes: row-major slots,
where a warp instruction touched 8 rows, made the last program's sum of 13 slots cost ~12 us at 32 rows
(sweeps/wgr_coalesced: M=32 K14336 N4096 32.93 -> 24.73 us, M=16 20.44 -> 19.12).

Measured on the H200 (bf16 x, group 128; us at K4096 N14336 / K14336 N4096 / 4096^2, with zero points;
gemm_int4-h200.json at 77f2b22): M = 2 16.07 / 17.30 (1.86x / 1.83x bf16 cuBLAS; two-row PAIRS at 4096^2), M = 4
16.11 / 17.36 / 9.94 (1.88x / 1.83x / 1.32x), M = 16 18.37 / 19.22 / 10.38 (1.66x / 1.68x / 1.29x), M = 64 27.35 /
28.32 / 15.83 (1.22x / 1.26x / 0.75x; the tiled kernel had 0.88x / 0.94x / 0.66x); tiled2 was at ~1x. What moved it
(sweeps/wgr .. wgr5, gps): the scales / zeros in the TMA ring (M = 16 22.1 -> 19.5: ncu had put 37-38 % of the
stalls on global loads the compiler consumed at once), and since 47969ee the stream-K step's (K step, column tile,
row tile) carried from step to step instead of three runtime divisions (524 -> 482 SASS instructions on the step
path at 8 rows x 128 columns, offline sm_90a; ~5 % faster). What did not: stream-K instead of split-K at the same
loads, warp specialisation (+-3 %), 8 warps, 6 stages, 64 columns; two or four steps per ring slot (GPS, 47969ee:
431 / 408 instructions a step, slower everywhere, M = 16 by a third) and mma.sync with x^T read from the slot
straight into its B operand (MMA2, 2cd5585: 63 registers instead of 127, up to 8 programs per SM, 12-18 % slower);
both dropped (sweeps/gps, sweeps/mma2).

Where the time goes (M = 4, K4096 N14336; benchmarks/wgr_ablate.py and tma_ring_probe.py, same harness as the
suite): the kernel 16.1 us; its TMA ring alone, same boxes and walk, 9.6 us (3.26 TB/s, sweeps/tma_ring); the kernel
without its stream-K flush 13.6, without flush, unpack and wgmma 10.6 (sweeps/wgr_ablate2). So the flush (partial
store, fence, arrival atomic, the last program's sum: the tail every program ends with) costs 2.5 us (3.9 at K14336
N4096, where ~17 programs meet each tile), unpack + wgmma ~3 us, the rest of the loop ~1 us; the 3x bar (10.2 us) is
~0.6 us above the ring alone. Reading the other programs' partials two or four at a time did not shorten the full
kernel (sweeps/wgr_ablate_batched, wgr_flush_loads). The second subtraction of the zero-point unpack costs ~0.8 us
(sweeps/wgr_nosub: without it 15.35-15.40, symmetric weights 15.22-15.25); taking the zero points out of the unpack
into fp32 x row sums per step (XSUM, 18 fewer instructions) was slower, 16.74 (sweeps/wgr_xsum). A ring carrying the
words only (x, scales and zeros left out, ABLATE 128) bounds loading those once per program instead of per step at
0.4-1.1 us (sweeps/wgr_words). ncu of the table pick (profiles/ncu-wgr-m4-d1daae1.txt): issue slots 63 % busy, DRAM
38 %, L1 44 %, L2 47 %, 64 % of shared-load wavefronts from bank conflicts (the word reads).

No interpreter: Gluon kernels do not run under TRITON_INTERPRET. On CPU the K-order bookkeeping is tested by
emulation (`wgr_emulate` repeats the kernel's joins, reshapes and permutations in torch), the stream-K partition
by `sk_partition`, and tests/kernels/sm90_offline.py compiles every variant for sm_90a (layouts checked,
registers, shared memory, spills); the kernels themselves are checked on the GPU (tests marked gpu, the
gemm_int4 suite's check of every timed config).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .host import cdiv, interpreting, sm_count
from .workspace import arrival_counters

try:  # Gluon ships with triton >= 3.5; kernopt's CPU installs have it too (triton 3.6)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # the Gluon API this file uses (triton 3.6); an older Gluon leaves impl "wgr" unavailable, nothing else
    HAVE_GLUON = hasattr(gluon, "constexpr_function") and all(
        hasattr(gl, name) for name in ("DistributedLinearLayout", "warp_specialize", "inline_asm_elementwise"))
except ImportError:  # pragma: no cover - older triton
    HAVE_GLUON = False


def _pair_asm(shift: int, bias_hi2: int, sub: str, zeros: Optional[bool]) -> str:
    """PTX: nibbles i, i + 4 (shift = 4 i) of word $2 as the 16-bit float pair (q_i - z, q_i+4 - z) in $0, $1. The
    LOP3 makes (B + q) under the float's exponent bits; symmetric weights subtract $3 = (B + 8, B + 8) (exact); with
    zero points (which may be fractional) it subtracts (B, B), exact, then $3 = (z, z), one rounding of q - z.
    zeros=None: no subtraction, the pair is (B + q_i, B + q_i+4)."""
    if zeros is None:
        centre = ""
    elif zeros:
        centre = "mov.b32 c, %#010x; %s t, t, c; %s t, t, $3;" % (bias_hi2, sub, sub)
    else:
        centre = "%s t, t, $3;" % sub
    return ("{ .reg .b32 t, c; shr.b32 t, $2, %d; lop3.b32 t, t, 0x000F000F, %#010x, 0xEA; %s mov.b32 {$0, $1}, t; }"
            % (shift, bias_hi2, centre))


# The dot's K order within a step, as the kernel builds it (wgr_emulate repeats these exact ops on CPU):
# the unpack joins the pairs into [n, word, e, h, s] (nibble 2 s + h + 4 e), splits word = 4 c + l, and A_PERM takes
# [n, c, l, e, h, s] to [n, c, s, h, l, e]; x in natural order is [m, c, l, e, s, h] (k = 32 c + 8 l + 4 e + 2 s + h)
# and X_PERM takes it to the same [m, c, s, h, l, e]. Position p = 32 c + 16 s + 8 h + 2 l + e.
A_PERM = (0, 1, 5, 4, 2, 3)
X_PERM = (0, 1, 4, 5, 2, 3)

if HAVE_GLUON:
    _A_PERM = gl.constexpr(list(A_PERM))
    _X_PERM = gl.constexpr(list(X_PERM))
    _BF16 = [[gl.constexpr(_pair_asm(4 * i, 0x43004300, "sub.rn.bf16x2", z)) for i in range(4)] for z in (0, 1)]
    _FP16 = [[gl.constexpr(_pair_asm(4 * i, 0x64006400, "sub.rn.f16x2", z)) for i in range(4)] for z in (0, 1)]
    (_BF16_P0, _BF16_P1, _BF16_P2, _BF16_P3), (_BF16_Z0, _BF16_Z1, _BF16_Z2, _BF16_Z3) = _BF16
    (_FP16_P0, _FP16_P1, _FP16_P2, _FP16_P3), (_FP16_Z0, _FP16_Z1, _FP16_Z2, _FP16_Z3) = _FP16
    _RAW_PAIR = gl.constexpr("mov.b32 {$0, $1}, $2;")  # ABLATE 1: a word's bits as the pair, no unpack
    # ABLATE 64: (B + q) pairs, no subtraction
    _BF16_B0, _BF16_B1, _BF16_B2, _BF16_B3 = [gl.constexpr(_pair_asm(4 * i, 0x43004300, "", None)) for i in range(4)]
    _FP16_B0, _FP16_B1, _FP16_B2, _FP16_B3 = [gl.constexpr(_pair_asm(4 * i, 0x64006400, "", None)) for i in range(4)]

    @gluon.constexpr_function
    def _word_layout(BLOCK_N, KS, NUM_WARPS):
        """[BLOCK_N, KS / 8] words: lane t of warp w holds rows 16 w + t // 4 (+ 8, + 16 NUM_WARPS r) and words
        t % 4 + 4 c, the rows and K chunks of wgmma's A fragment (see the module docstring)."""
        rows_w = 16 * NUM_WARPS
        reg = [[8, 0]]
        c = 4
        while c < KS // 8:
            reg.append([0, c])
            c *= 2
        r = rows_w
        while r < BLOCK_N:
            reg.append([r, 0])
            r *= 2
        warp = []
        r = 16
        while r < rows_w:
            warp.append([r, 0])
            r *= 2
        return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
                                          warp_bases=warp, block_bases=[], shape=[BLOCK_N, KS // 8])

    @gluon.constexpr_function
    def _word_layout_t(BLOCK_N, KS, NUM_WARPS):
        """_word_layout of the [KS / 8, BLOCK_N] tile as TMA stores it (word rows, then columns): the same lanes and
        registers with the two axes swapped. The words are read from shared memory in this layout and permuted in
        registers (free): on the H200 a load through a permuted shared-memory view returned the tile unpermuted
        (benchmarks/wgr_probe.py, 7d92b7d: the lane meant for word (n, j) got flat element 16 n + j of the tile)."""
        t = _word_layout(BLOCK_N, KS, NUM_WARPS)
        swap = lambda bases: [[b[1], b[0]] for b in bases]  # noqa: E731
        return gl.DistributedLinearLayout(reg_bases=swap(t.reg_bases), lane_bases=swap(t.lane_bases),
                                          warp_bases=swap(t.warp_bases), block_bases=[], shape=[KS // 8, BLOCK_N])

    @gluon.constexpr_function
    def _x_layout(BLOCK_M, KS, NUM_WARPS):
        """[BLOCK_M, KS] x tile in natural K order: 8 consecutive k (16 bytes) per thread."""
        tk = min(32, KS // 8)
        return gl.BlockedLayout([1, 8], [32 // tk, tk], [NUM_WARPS, 1], [1, 0])

    @gluon.constexpr_function
    def _wgr_layouts(BLOCK_N, BLOCK_M, KS, NUM_WARPS):
        """The kernels' register layouts: words (WL) and as TMA stores them (WLT), the word rows' vectors (ZL), the
        wgmma accumulator (MMA), its register A operand (OP), the natural-order x tile (XL), the accumulator's rows
        (ROW) and columns (COL)."""
        wl = _word_layout(BLOCK_N, KS, NUM_WARPS)
        mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BLOCK_M, 16])
        return (wl, _word_layout_t(BLOCK_N, KS, NUM_WARPS), gl.SliceLayout(1, wl), mma,
                gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2), _x_layout(BLOCK_M, KS, NUM_WARPS),
                gl.SliceLayout(1, mma), gl.SliceLayout(0, mma))

    @gluon.jit
    def _pairs(w, zz, ASM: gl.constexpr, BF16: gl.constexpr):
        if BF16:
            lo, hi = gl.inline_asm_elementwise(ASM, "=h,=h,r,r", [w, zz], dtype=(gl.bfloat16, gl.bfloat16),
                                               is_pure=True, pack=1)
        else:
            lo, hi = gl.inline_asm_elementwise(ASM, "=h,=h,r,r", [w, zz], dtype=(gl.float16, gl.float16),
                                               is_pure=True, pack=1)
        return gl.join(lo, hi)

    @gluon.jit
    def _word_pairs(w, zz, A0: gl.constexpr, A1: gl.constexpr, A2: gl.constexpr, A3: gl.constexpr,
                    BF16: gl.constexpr):
        """Each word's four pairs (_pairs with the shifts 0, 4, 8, 12 of A0..A3), joined as [n, word, e, h, s]:
        nibble 2 s + h + 4 e."""
        return gl.join(gl.join(_pairs(w, zz, A0, BF16), _pairs(w, zz, A1, BF16)),
                       gl.join(_pairs(w, zz, A2, BF16), _pairs(w, zz, A3, BF16)))

    @gluon.jit
    def _operand_pairs(w, zz, BF16: gl.constexpr, HAS_ZEROS: gl.constexpr, OFFSET: gl.constexpr = False):
        """_word_pairs with the unpack for x's dtype (BF16 or fp16) and the weights' zero points: each word's (q - z)
        pairs joined as [..., e, h, s] (nibble 2 s + h + 4 e); zz: the pair to subtract (_zero_pairs) as 32 bits,
        broadcast along the words. OFFSET: (B + q), nothing subtracted (zz unused). wgr and ldmma
        (kernels/int4_ldmma.py) share it."""
        if BF16:
            if OFFSET:
                j = _word_pairs(w, zz, _BF16_B0, _BF16_B1, _BF16_B2, _BF16_B3, True)
            elif HAS_ZEROS:
                j = _word_pairs(w, zz, _BF16_Z0, _BF16_Z1, _BF16_Z2, _BF16_Z3, True)
            else:
                j = _word_pairs(w, zz, _BF16_P0, _BF16_P1, _BF16_P2, _BF16_P3, True)
        else:
            if OFFSET:
                j = _word_pairs(w, zz, _FP16_B0, _FP16_B1, _FP16_B2, _FP16_B3, False)
            elif HAS_ZEROS:
                j = _word_pairs(w, zz, _FP16_Z0, _FP16_Z1, _FP16_Z2, _FP16_Z3, False)
            else:
                j = _word_pairs(w, zz, _FP16_P0, _FP16_P1, _FP16_P2, _FP16_P3, False)
        return j

    @gluon.jit
    def _unpack_operand(w, zz, BLOCK_N: gl.constexpr, KS: gl.constexpr, BF16: gl.constexpr, HAS_ZEROS: gl.constexpr,
                        OP: gl.constexpr, OFFSET: gl.constexpr = False):
        """[BLOCK_N, KS / 8] words -> [BLOCK_N, KS] (q - z) in wgmma's A-operand layout OP, K in wgr_k_order;
        zz: the row's pair to subtract (_zero_pairs) as 32 bits, broadcast along the words. OFFSET: (B + q), nothing
        subtracted (zz unused)."""
        j = _operand_pairs(w, zz, BF16, HAS_ZEROS, OFFSET)
        j = gl.reshape(j, [BLOCK_N, KS // 32, 4, 2, 2, 2])  # [n, c, l, e, h, s]: word = 4 c + l
        j = gl.permute(j, _A_PERM.value)                       # [n, c, s, h, l, e]
        a = gl.reshape(j, [BLOCK_N, KS])                    # p = 32 c + 16 s + 8 h + 2 l + e
        return gl.convert_layout(a, OP, assert_trivial=True)

    @gluon.jit
    def _x_dot_order(xv, BLOCK_M: gl.constexpr, KS: gl.constexpr):
        """[BLOCK_M, KS] x in natural K order (k = 32 c + 8 l + 4 e + 2 s + h) -> the dot's order
        (p = 32 c + 16 s + 8 h + 2 l + e): a relabelling of each thread's registers."""
        t = gl.reshape(xv, [BLOCK_M, KS // 32, 4, 2, 2, 2])  # [m, c, l, e, s, h]
        t = gl.permute(t, _X_PERM.value)                        # [m, c, s, h, l, e]
        return gl.reshape(t, [BLOCK_M, KS])

    @gluon.jit
    def _load_zeros(z_ptr, rn, rn_ok, g, stride_zn, stride_zg, HAS_ZEROS: gl.constexpr, ZL: gl.constexpr,
                    BLOCK_N: gl.constexpr):
        """The rows' zero points of group g as stored (a constant without zero points); _zero_pairs converts them
        where they are used, a step later, so that the load's latency is not waited on at once."""
        if HAS_ZEROS:
            return gl.load(z_ptr + rn * stride_zn + g * stride_zg, mask=rn_ok, other=0.0)
        else:
            return gl.zeros([BLOCK_N], gl.float32, layout=ZL)

    @gluon.jit
    def _zero_pairs(z, HAS_ZEROS: gl.constexpr, BF16: gl.constexpr):
        """[BLOCK_N] int32: the pair of 16-bit floats each row's unpack subtracts: (z, z) with zero points (z rounded
        to x's dtype once), else (B + 8, B + 8)."""
        zf = z.to(gl.float32)
        if not HAS_ZEROS:
            if BF16:
                zf = zf + 136.0
            else:
                zf = zf + 1032.0
        if BF16:
            bits = zf.to(gl.bfloat16).to(gl.int16, bitcast=True)
        else:
            bits = zf.to(gl.float16).to(gl.int16, bitcast=True)
        b32 = bits.to(gl.int32) & 0xFFFF
        return b32 | (b32 << 16)

    @gluon.jit
    def _int4_wgr_kernel(
        w_desc, x_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
        M, N, K, K_PER_SPLIT, SPLIT_K,
        stride_xm, stride_xk, stride_sn, stride_sg, stride_zn, stride_zg, stride_om, stride_on,
        GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, KS: gl.constexpr, STAGES: gl.constexpr,
    ):
        NUM_WARPS: gl.constexpr = gl.num_warps()
        BF16: gl.constexpr = x_ptr.dtype.element_ty == gl.bfloat16
        dt: gl.constexpr = x_ptr.dtype.element_ty
        LAYOUTS: gl.constexpr = _wgr_layouts(BLOCK_N, BLOCK_M, KS, NUM_WARPS)
        WL: gl.constexpr = LAYOUTS[0]
        WLT: gl.constexpr = LAYOUTS[1]
        ZL: gl.constexpr = LAYOUTS[2]
        MMA: gl.constexpr = LAYOUTS[3]
        OP: gl.constexpr = LAYOUTS[4]
        XL: gl.constexpr = LAYOUTS[5]
        ROW: gl.constexpr = LAYOUTS[6]
        COL: gl.constexpr = LAYOUTS[7]
        XS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, KS], dt)

        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        pid_m = gl.program_id(2)
        n0 = pid_n * BLOCK_N
        k_lo = pid_k * K_PER_SPLIT
        k_hi = gl.minimum(k_lo + K_PER_SPLIT, K)
        steps = gl.cdiv(k_hi - k_lo, KS)

        w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, KS // 8, BLOCK_N], w_desc.layout)
        x_smem = gl.allocate_shared_memory(dt, [2, BLOCK_M, KS], XS)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()
        for i in gl.static_range(STAGES - 1):  # the ring's first STAGES - 1 steps
            ok = i < steps
            mbarrier.expect(bars.index(i), w_desc.block_type.nbytes, pred=ok)
            tma.async_copy_global_to_shared(w_desc, [(k_lo + i * KS) // 8, n0], bars.index(i), w_smem.index(i),
                                            pred=ok)

        xm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, XL))
        xk = gl.arange(0, KS, layout=gl.SliceLayout(0, XL))
        x_rows = x_ptr + xm[:, None] * stride_xm
        x_ok = (xm < M)[:, None]
        zn = n0 + gl.arange(0, BLOCK_N, layout=ZL)  # rows n in the word layout (zero pairs) and the MMA's (scales)
        rn = n0 + gl.arange(0, BLOCK_N, layout=ROW)
        rn_ok = rn < N

        kx = k_lo + xk
        xv = gl.load(x_rows + kx[None, :] * stride_xk, mask=x_ok & (kx < k_hi)[None, :], other=0.0)
        g = k_lo // GROUP
        sv = gl.load(s_ptr + rn * stride_sn + g * stride_sg, mask=rn_ok, other=0.0)
        zv = _load_zeros(z_ptr, zn, zn < N, g, stride_zn, stride_zg, HAS_ZEROS, ZL, BLOCK_N)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
        zero_acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
        for i in range(steps):
            k0 = k_lo + i * KS
            slot = i % STAGES
            xb = x_smem.index(i % 2)
            xb.store(_x_dot_order(xv, BLOCK_M, KS))
            s_cur = sv.to(gl.float32)
            zz_cur = _zero_pairs(zv, HAS_ZEROS, BF16)
            # the next step's x, scales and zeros in flight while this one is unpacked
            kx = k0 + KS + xk
            xv = gl.load(x_rows + kx[None, :] * stride_xk, mask=x_ok & (kx < k_hi)[None, :], other=0.0)
            g = gl.minimum(k0 + KS, K - 1) // GROUP
            sv = gl.load(s_ptr + rn * stride_sn + g * stride_sg, mask=rn_ok, other=0.0)
            zv = _load_zeros(z_ptr, zn, zn < N, g, stride_zn, stride_zg, HAS_ZEROS, ZL, BLOCK_N)
            fence_async_shared()
            gl.thread_barrier()  # x^T stored by every warp; every warp is done with step i - 1 (its ring slot)
            nxt = i + STAGES - 1
            ok = nxt < steps
            ns = nxt % STAGES
            mbarrier.expect(bars.index(ns), w_desc.block_type.nbytes, pred=ok)
            tma.async_copy_global_to_shared(w_desc, [(k_lo + nxt * KS) // 8, n0], bars.index(ns), w_smem.index(ns),
                                            pred=ok)
            mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
            words = gl.convert_layout(gl.permute(w_smem.index(slot).load(WLT), (1, 0)), WL, assert_trivial=True)
            a = _unpack_operand(words, zz_cur[:, None], BLOCK_N, KS, BF16, HAS_ZEROS, OP)
            d = warpgroup_mma(a, xb.permute((1, 0)), zero_acc, use_acc=False)
            acc += d * s_cur[:, None]

        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        om = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=COL)
        mask = rn_ok[:, None] & (om < M)[None, :]
        if not SPLIT:  # one K slice (SPLIT_K, a runtime value, is 1)
            total = acc
            last = True
        else:  # the tile's SPLIT_K workspace slots (_slot_offsets: coalesced), one per K slice
            tile = pid_m * gl.num_programs(0) + pid_n
            offs = _slot_offsets(gl.arange(0, BLOCK_N, layout=ROW), gl.arange(0, BLOCK_M, layout=COL), BLOCK_N, BLOCK_M,
                                 NUM_WARPS)
            base = part_ptr + tile.to(gl.int64) * SPLIT_K * BLOCK_N * BLOCK_M
            total, last = _slots_finish(acc, base, offs, pid_k, SPLIT_K, cnt_ptr, tile, BLOCK_N * BLOCK_M)
        if last:
            if HAS_BIAS:
                total += gl.load(b_ptr + rn, mask=rn_ok, other=0.0).to(gl.float32)[:, None]
            gl.store(out_ptr + om[None, :] * stride_om + rn[:, None] * stride_on,
                     total.to(out_ptr.dtype.element_ty), mask=mask)


    @gluon.jit
    def _slots_finish(part, base, offs, slot, n_slots, cnt_ptr, tile, SLOT: gl.constexpr):
        """Single-pass split-K's finish for one output tile (kernels/workspace.py): this slice's fp32 `part` into
        slot `slot` of the tile's n_slots (base + slot SLOT + offs), an acq_rel arrival on the tile's counter; the
        last of the n_slots programs to arrive gets the slots' sum and re-arms the counter. (total, last): the sum
        where last, zeros elsewhere."""
        gl.store(base + slot * SLOT + offs, part)
        gl.thread_barrier()  # every thread's partial before the (release) arrival
        arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        last = arrived == n_slots - 1
        total = gl.zeros_like(part)
        if last:
            for c in range(n_slots):
                total += gl.load(base + c * SLOT + offs, cache_modifier=".cg")
            gl.atomic_xchg(cnt_ptr + tile, 0)
        return total, last

    @gluon.jit
    def _sk_cta_of(s, P, W):
        """The program whose stream-K range [p W // P, (p + 1) W // P) holds global step s."""
        return ((s + 1) * P + W - 1) // W - 1

    @gluon.jit
    def _sk_coords(s, spt, tiles_n):
        """Global step s as (K step, column tile, row tile): the divisions once per program, before its loop."""
        tile = s // spt
        return s % spt, tile % tiles_n, tile // tiles_n

    @gluon.jit
    def _sk_next(ks, tn, tm, spt, tiles_n):
        """The step after (ks, tn, tm) in the tile-major order, by carries instead of a division per step (three
        runtime divisions a step were ~8 % of the step path's instructions, offline sm_90a)."""
        wrap = (ks + 1 == spt).to(gl.int32)
        ks = (ks + 1) * (1 - wrap)
        tn = tn + wrap
        wrap = (tn == tiles_n).to(gl.int32)
        return ks, tn * (1 - wrap), tm + wrap

    @gluon.jit
    def _sk_issue(w_desc, x_desc, s_desc, z_desc, bar, w_buf, x_buf, s_buf, z_buf, ks, tn, tm, ok,
                  GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, KS: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_M: gl.constexpr, PARAM_TMA: gl.constexpr, ABLATE: gl.constexpr = 0):
        """TMA of the step (K step ks of column tile tn, row tile tm: _sk_coords) words [KS / 8, BLOCK_N], x tile
        [BLOCK_M, KS] and the group's scales (and zeros) [1, BLOCK_N] into one ring slot: no global load in the loop
        is waited on by the warps. ABLATE 128 (_step_mma's knob): the words only (the slot's x, scales and zeros
        stay as they were)."""
        k0 = ks * KS
        n0 = tn * BLOCK_N
        if (ABLATE & 128) != 0:
            mbarrier.expect(bar, w_desc.block_type.nbytes, pred=ok)
            tma.async_copy_global_to_shared(w_desc, [k0 // 8, n0], bar, w_buf, pred=ok)
            return
        if PARAM_TMA and HAS_ZEROS:
            mbarrier.expect(bar, w_desc.block_type.nbytes + x_desc.block_type.nbytes + s_desc.block_type.nbytes
                            + z_desc.block_type.nbytes, pred=ok)
        elif PARAM_TMA:
            mbarrier.expect(bar, w_desc.block_type.nbytes + x_desc.block_type.nbytes + s_desc.block_type.nbytes,
                            pred=ok)
        else:
            mbarrier.expect(bar, w_desc.block_type.nbytes + x_desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(w_desc, [k0 // 8, n0], bar, w_buf, pred=ok)
        tma.async_copy_global_to_shared(x_desc, [tm * BLOCK_M, k0], bar, x_buf, pred=ok)
        if PARAM_TMA:
            tma.async_copy_global_to_shared(s_desc, [k0 // GROUP, n0], bar, s_buf, pred=ok)
            if HAS_ZEROS:
                tma.async_copy_global_to_shared(z_desc, [k0 // GROUP, n0], bar, z_buf, pred=ok)

    @gluon.jit
    def _slot_params(s_buf, z_buf, HAS_ZEROS: gl.constexpr, BF16: gl.constexpr, BLOCK_N: gl.constexpr,
                     ROW: gl.constexpr, ZL: gl.constexpr):
        """A ring slot's scales (fp32, MMA row layout) and zero pairs (word layout, _zero_pairs)."""
        s_cur = s_buf.reshape([BLOCK_N]).load(ROW).to(gl.float32)
        if HAS_ZEROS:
            zz_cur = _zero_pairs(z_buf.reshape([BLOCK_N]).load(ZL), True, BF16)
        else:
            zz_cur = _zero_pairs(gl.zeros([BLOCK_N], gl.float32, layout=ZL), False, BF16)
        return s_cur, zz_cur

    @gluon.jit
    def _slot_operands(w_buf, xr_buf, xb, BLOCK_M: gl.constexpr, KS: gl.constexpr, WL: gl.constexpr,
                       WLT: gl.constexpr, XL: gl.constexpr, ABLATE: gl.constexpr = 0, X_DOT: gl.constexpr = False):
        """A ring slot's x tile stored into xb in the dot's K order (X_DOT: the slot holds it so already, nothing
        stored), and its words in the word layout (read in the tile's own orientation, permuted in registers)."""
        if (ABLATE & 8) == 0 and not X_DOT:
            xb.store(_x_dot_order(xr_buf.load(XL), BLOCK_M, KS))
        return gl.convert_layout(gl.permute(w_buf.load(WLT), (1, 0)), WL, assert_trivial=True)

    @gluon.jit
    def _step_mma(acc, words, zz, s_cur, xb, zero_acc, BLOCK_N: gl.constexpr, KS: gl.constexpr, BF16: gl.constexpr,
                  HAS_ZEROS: gl.constexpr, OP: gl.constexpr, ABLATE: gl.constexpr = 0, ROW: gl.constexpr = None):
        """One step's product: the words unpacked to (q - z) in the register operand, times x^T from xb, scaled
        per row into acc. ABLATE (bits; a measurement, wrong results; benchmarks/wgr_ablate.py only): 1 the operand
        is the words' bits as they are (no unpack), 2 neither unpack nor MMA (a row sum of the words instead); the
        stream-K kernel also takes 4 (no flush: nothing stored) and 8 (x^T not relabelled into xb); 64 the operand
        is (B + q), nothing subtracted; 128 the ring carries the words only (_sk_issue)."""
        if (ABLATE & 2) != 0:
            return acc + gl.convert_layout(gl.sum(words, axis=1).to(gl.float32), ROW)[:, None] * s_cur[:, None]
        if (ABLATE & 1) != 0:
            p = _pairs(words, words, _RAW_PAIR, BF16)
            j = gl.reshape(gl.join(gl.join(p, p), gl.join(p, p)), [BLOCK_N, KS // 32, 4, 2, 2, 2])
            a = gl.convert_layout(gl.reshape(gl.permute(j, _A_PERM.value), [BLOCK_N, KS]), OP, assert_trivial=True)
        else:
            a = _unpack_operand(words, zz[:, None], BLOCK_N, KS, BF16, HAS_ZEROS, OP, (ABLATE & 64) != 0)
        d = warpgroup_mma(a, xb.permute((1, 0)), zero_acc, use_acc=False)
        return acc + d * s_cur[:, None]

    @gluon.constexpr_function
    def _log2(v):
        return int(v).bit_length() - 1

    @gluon.jit
    def _slot_offsets(nr, mr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, NUM_WARPS: gl.constexpr):
        """[BLOCK_N, BLOCK_M] offsets of the accumulator's elements in a workspace slot, in the order of the wgmma
        accumulator's registers: each warp's load or store of one register pair is 256 contiguous bytes (m bit 0,
        then the lane's bits m 1-2 and n 0-2, the warp's n bits, then the registers' n bit 3, m bits >= 3 and n above
        the warpgroup). With row-major slots, where one warp instruction touched 8 rows, the kernel took 32.93 us at
        M=32 K14336 N4096 against 24.73 (sweeps/wgr_coalesced)."""
        WB: gl.constexpr = _log2(NUM_WARPS)
        MB: gl.constexpr = _log2(BLOCK_M // 8)
        a_n = ((nr & 7) << 3) | (((nr >> 4) & (NUM_WARPS - 1)) << 6) | (((nr >> 3) & 1) << (6 + WB)) \
            | ((nr >> (4 + WB)) << (7 + WB + MB))
        a_m = (mr & 1) | (((mr >> 1) & 3) << 1) | ((mr >> 3) << (7 + WB))
        offs = a_n[:, None] + a_m[None, :]
        return gl.max_contiguous(gl.multiple_of(offs, [1, 2]), [1, 2])

    @gluon.jit
    def _sk_flush(acc, tile, pid, P, W, spt, tiles_n, M, N, MAXC, nr, mr, part_ptr, cnt_ptr, b_ptr, out_ptr,
                  stride_om, stride_on, HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                  MMA: gl.constexpr, ABLATE: gl.constexpr = 0):
        """A program's partial sum of `tile` at the end of its segment: the output if it ran the whole tile, else
        its workspace slot (index among the tile's programs), and the last of them to arrive sums the slots in
        program order, adds the bias, writes the output and re-arms the tile's counter. ABLATE (_step_mma's
        measurement knob): 16 stores the partial only (no arrival), 32 arrives and re-arms but neither sums nor
        writes the output."""
        rn = (tile % tiles_n) * BLOCK_N + nr
        om = (tile // tiles_n) * BLOCK_M + mr
        mask = (rn < N)[:, None] & (om < M)[None, :]
        c_lo = _sk_cta_of(tile * spt, P, W)
        n_c = _sk_cta_of(tile * spt + spt - 1, P, W) - c_lo + 1
        if n_c == 1:
            total = acc
            last = True
        else:
            offs = _slot_offsets(nr, mr, BLOCK_N, BLOCK_M, gl.num_warps())
            base = part_ptr + tile.to(gl.int64) * MAXC * BLOCK_N * BLOCK_M
            gl.store(base + (pid - c_lo) * BLOCK_N * BLOCK_M + offs, acc)
            if (ABLATE & 16) != 0:
                total = acc
                last = False
            else:
                gl.thread_barrier()  # every thread's partial before the (release) arrival
                arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
                last = arrived == n_c - 1
                total = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
                if last:
                    if (ABLATE & 32) == 0:
                        for c in range(n_c):
                            total += gl.load(base + c * BLOCK_N * BLOCK_M + offs, cache_modifier=".cg")
                    gl.atomic_xchg(cnt_ptr + tile, 0)
                if (ABLATE & 32) != 0:
                    last = False
        if last:
            if HAS_BIAS:
                total += gl.load(b_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)[:, None]
            gl.store(out_ptr + om[None, :] * stride_om + rn[:, None] * stride_on, total.to(out_ptr.dtype.element_ty),
                     mask=mask)

    @gluon.jit
    def _sk_producer(w_desc, x_desc, s_desc, z_desc, w_smem, xr_smem, s_smem, z_smem, ready, empty, W, spt, tiles_n,
                     GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, KS: gl.constexpr, BLOCK_N: gl.constexpr,
                     BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
        """WS's load partition (one warp): the program's steps' TMA copies into the ring, each slot once the
        consumers have released it (empty[slot]; the first round's waits pass on a fresh barrier's phase)."""
        pid = gl.program_id(0)
        P = gl.num_programs(0)
        s_lo = (pid * W) // P
        s_hi = ((pid + 1) * W) // P
        ks, tn, tm = _sk_coords(s_lo, spt, tiles_n)
        for i in range(s_hi - s_lo):
            slot = i % STAGES
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            _sk_issue(w_desc, x_desc, s_desc, z_desc, ready.index(slot), w_smem.index(slot), xr_smem.index(slot),
                      s_smem.index(slot), z_smem.index(slot if HAS_ZEROS else 0), ks, tn, tm, True,
                      GROUP, HAS_ZEROS, KS, BLOCK_N, BLOCK_M, True)
            ks, tn, tm = _sk_next(ks, tn, tm, spt, tiles_n)

    @gluon.jit
    def _sk_consumer(x_desc, w_smem, xr_smem, x_smem, s_smem, z_smem, ready, empty, b_ptr, out_ptr, part_ptr,
                     cnt_ptr, M, N, W, spt, tiles_n, MAXC, stride_om, stride_on,
                     HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr,
                     BLOCK_N: gl.constexpr, KS: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
        """WS's default partition (one warpgroup): per step, wait for the slot, read its words / x / scales /
        zeros, release it, then unpack, wgmma and the stream-K flush, with no TMA issue (and none of the CTA-wide
        barriers Gluon puts around it) on its path."""
        BF16: gl.constexpr = x_desc.dtype == gl.bfloat16
        LAYOUTS: gl.constexpr = _wgr_layouts(BLOCK_N, BLOCK_M, KS, NUM_WARPS)
        WL: gl.constexpr = LAYOUTS[0]
        WLT: gl.constexpr = LAYOUTS[1]
        ZL: gl.constexpr = LAYOUTS[2]
        MMA: gl.constexpr = LAYOUTS[3]
        OP: gl.constexpr = LAYOUTS[4]
        XL: gl.constexpr = LAYOUTS[5]
        ROW: gl.constexpr = LAYOUTS[6]
        COL: gl.constexpr = LAYOUTS[7]
        pid = gl.program_id(0)
        P = gl.num_programs(0)
        s_lo = (pid * W) // P
        s_hi = ((pid + 1) * W) // P
        nr = gl.arange(0, BLOCK_N, layout=ROW)
        mr = gl.arange(0, BLOCK_M, layout=COL)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
        zero_acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
        ks, tn, tm = _sk_coords(s_lo, spt, tiles_n)
        for i in range(s_hi - s_lo):
            s = s_lo + i
            slot = i % STAGES
            mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
            s_cur, zz_cur = _slot_params(s_smem.index(slot), z_smem.index(slot if HAS_ZEROS else 0), HAS_ZEROS, BF16,
                                         BLOCK_N, ROW, ZL)
            xb = x_smem.index(i % 2)
            words = _slot_operands(w_smem.index(slot), xr_smem.index(slot), xb, BLOCK_M, KS, WL, WLT, XL)
            fence_async_shared()
            gl.thread_barrier()  # the warpgroup's x^T stores done, and its reads of this slot
            mbarrier.arrive(empty.index(slot), count=1)
            acc = _step_mma(acc, words, zz_cur, s_cur, xb, zero_acc, BLOCK_N, KS, BF16, HAS_ZEROS, OP)
            if (ks == spt - 1) | (s == s_hi - 1):
                _sk_flush(acc, tm * tiles_n + tn, pid, P, W, spt, tiles_n, M, N, MAXC, nr, mr, part_ptr, cnt_ptr,
                          b_ptr, out_ptr, stride_om, stride_on, HAS_BIAS, BLOCK_N, BLOCK_M, MMA)
                acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
            ks, tn, tm = _sk_next(ks, tn, tm, spt, tiles_n)

    @gluon.jit
    def _int4_wgr_ws_kernel(
        w_desc, x_desc, s_desc, z_desc, b_ptr, out_ptr, part_ptr, cnt_ptr,
        M, N, K, W, spt, tiles_n, MAXC, stride_om, stride_on,
        GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, KS: gl.constexpr, STAGES: gl.constexpr,
        NUM_WARPS: gl.constexpr,
    ):
        """Stream-K wgr, warp-specialised: a one-warp partition issues the TMA ring (words, x, scales, zeros) and the
        warpgroup only consumes it (ready / empty mbarriers per slot)."""
        dt: gl.constexpr = x_desc.dtype
        XS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, KS], dt)
        w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, KS // 8, BLOCK_N], w_desc.layout)
        xr_smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_M, KS], x_desc.layout)
        x_smem = gl.allocate_shared_memory(dt, [2, BLOCK_M, KS], XS)
        s_smem = gl.allocate_shared_memory(s_desc.dtype, [STAGES, 1, BLOCK_N], s_desc.layout)
        z_smem = gl.allocate_shared_memory(z_desc.dtype, [STAGES if HAS_ZEROS else 1, 1, BLOCK_N], z_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        fence_async_shared()
        gl.warp_specialize([
            (_sk_consumer, (x_desc, w_smem, xr_smem, x_smem, s_smem, z_smem, ready, empty, b_ptr, out_ptr, part_ptr,
                            cnt_ptr, M, N, W, spt, tiles_n, MAXC, stride_om, stride_on, HAS_ZEROS, HAS_BIAS, BLOCK_M,
                            BLOCK_N, KS, STAGES, NUM_WARPS)),
            (_sk_producer, (w_desc, x_desc, s_desc, z_desc, w_smem, xr_smem, s_smem, z_smem, ready, empty, W, spt,
                            tiles_n, GROUP, HAS_ZEROS, KS, BLOCK_N, BLOCK_M, STAGES)),
        ], [1], [24])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))

    @gluon.jit
    def _sk_params(s_ptr, z_ptr, s, s_hi, spt, tiles_n, N, nr, nz, stride_sn, stride_sg, stride_zn, stride_zg,
                   GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, KS: gl.constexpr, BLOCK_N: gl.constexpr,
                   ZL: gl.constexpr, PARAM_TMA: gl.constexpr):
        """Global step s's scales (MMA row layout) and zeros (word layout), loaded (masked past s_hi); dummies
        with PARAM_TMA (the ring carries them)."""
        if PARAM_TMA:
            return gl.zeros_like(nr.to(gl.float32)), gl.zeros_like(nz.to(gl.float32))
        else:
            tile = s // spt
            g = ((s % spt) * KS) // GROUP
            rn = (tile % tiles_n) * BLOCK_N + nr
            sv = gl.load(s_ptr + rn * stride_sn + g * stride_sg, mask=(rn < N) & (s < s_hi), other=0.0)
            zn = (tile % tiles_n) * BLOCK_N + nz
            zv = _load_zeros(z_ptr, zn, (zn < N) & (s < s_hi), g, stride_zn, stride_zg, HAS_ZEROS, ZL, BLOCK_N)
            return sv, zv

    @gluon.jit
    def _int4_wgr_sk_kernel(
        w_desc, x_desc, s_desc, z_desc, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
        M, N, K, W, spt, tiles_n, MAXC, stride_sn, stride_sg, stride_zn, stride_zg, stride_om, stride_on,
        GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, KS: gl.constexpr, STAGES: gl.constexpr,
        PARAM_TMA: gl.constexpr, ABLATE: gl.constexpr = 0, X_DOT: gl.constexpr = False,
    ):
        """Persistent stream-K wgr: program p runs global steps [p W // P, (p + 1) W // P) of the W = tiles x spt
        (tile, K step) sequence, tile-major, through one TMA ring of words and x tiles; a tile's partial sums from
        its (at most MAXC) programs meet in the workspace, summed in program order by the last to arrive."""
        NUM_WARPS: gl.constexpr = gl.num_warps()
        BF16: gl.constexpr = x_desc.dtype == gl.bfloat16
        dt: gl.constexpr = x_desc.dtype
        LAYOUTS: gl.constexpr = _wgr_layouts(BLOCK_N, BLOCK_M, KS, NUM_WARPS)
        WL: gl.constexpr = LAYOUTS[0]
        WLT: gl.constexpr = LAYOUTS[1]
        ZL: gl.constexpr = LAYOUTS[2]
        MMA: gl.constexpr = LAYOUTS[3]
        OP: gl.constexpr = LAYOUTS[4]
        XL: gl.constexpr = LAYOUTS[5]
        ROW: gl.constexpr = LAYOUTS[6]
        COL: gl.constexpr = LAYOUTS[7]
        XS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, KS], dt)

        pid = gl.program_id(0)
        P = gl.num_programs(0)
        s_lo = (pid * W) // P
        s_hi = ((pid + 1) * W) // P

        w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, KS // 8, BLOCK_N], w_desc.layout)
        xr_smem = gl.allocate_shared_memory(dt, [STAGES, BLOCK_M, KS], x_desc.layout)
        if not X_DOT:  # x^T's copy in the dot's K order (X_DOT: the ring's x tile is the operand)
            x_smem = gl.allocate_shared_memory(dt, [2, BLOCK_M, KS], XS)
        s_smem = gl.allocate_shared_memory(s_desc.dtype, [STAGES, 1, BLOCK_N], s_desc.layout)
        z_smem = gl.allocate_shared_memory(z_desc.dtype, [STAGES if HAS_ZEROS else 1, 1, BLOCK_N], z_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()
        cks, ctn, ctm = _sk_coords(s_lo, spt, tiles_n)  # the step consumed next, and (below) the one issued next
        iks, itn, itm = cks, ctn, ctm
        for i in gl.static_range(STAGES - 1):
            _sk_issue(w_desc, x_desc, s_desc, z_desc, bars.index(i), w_smem.index(i), xr_smem.index(i),
                      s_smem.index(i), z_smem.index(i if HAS_ZEROS else 0), iks, itn, itm, s_lo + i < s_hi,
                      GROUP, HAS_ZEROS, KS, BLOCK_N, BLOCK_M, PARAM_TMA, ABLATE)
            iks, itn, itm = _sk_next(iks, itn, itm, spt, tiles_n)

        nr = gl.arange(0, BLOCK_N, layout=ROW)
        nz = gl.arange(0, BLOCK_N, layout=ZL)
        mr = gl.arange(0, BLOCK_M, layout=COL)
        # without PARAM_TMA: scales and zeros by register loads two steps ahead of their use
        sv1, zv1 = _sk_params(s_ptr, z_ptr, s_lo, s_hi, spt, tiles_n, N, nr, nz, stride_sn, stride_sg, stride_zn,
                              stride_zg, GROUP, HAS_ZEROS, KS, BLOCK_N, ZL, PARAM_TMA)
        sv2, zv2 = _sk_params(s_ptr, z_ptr, s_lo + 1, s_hi, spt, tiles_n, N, nr, nz, stride_sn, stride_sg, stride_zn,
                              stride_zg, GROUP, HAS_ZEROS, KS, BLOCK_N, ZL, PARAM_TMA)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
        zero_acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
        for i in range(s_hi - s_lo):
            s = s_lo + i
            slot = i % STAGES
            mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
            if PARAM_TMA:
                s_cur, zz_cur = _slot_params(s_smem.index(slot), z_smem.index(slot if HAS_ZEROS else 0), HAS_ZEROS,
                                             BF16, BLOCK_N, ROW, ZL)
            else:
                s_cur = sv1.to(gl.float32)
                zz_cur = _zero_pairs(zv1, HAS_ZEROS, BF16)
                sv1, zv1 = sv2, zv2
                sv2, zv2 = _sk_params(s_ptr, z_ptr, s + 2, s_hi, spt, tiles_n, N, nr, nz, stride_sn, stride_sg,
                                      stride_zn, stride_zg, GROUP, HAS_ZEROS, KS, BLOCK_N, ZL, PARAM_TMA)
            if X_DOT:
                xb = xr_smem.index(slot)
            else:
                xb = x_smem.index(i % 2)
            words = _slot_operands(w_smem.index(slot), xr_smem.index(slot), xb, BLOCK_M, KS, WL, WLT, XL, ABLATE,
                                   X_DOT)
            if not X_DOT:
                fence_async_shared()
            gl.thread_barrier()  # x^T stored by every warp; every warp done with step i - 1 and this slot's loads
            nxt = s + STAGES - 1
            ns = (i + STAGES - 1) % STAGES
            _sk_issue(w_desc, x_desc, s_desc, z_desc, bars.index(ns), w_smem.index(ns), xr_smem.index(ns),
                      s_smem.index(ns), z_smem.index(ns if HAS_ZEROS else 0), iks, itn, itm, nxt < s_hi,
                      GROUP, HAS_ZEROS, KS, BLOCK_N, BLOCK_M, PARAM_TMA, ABLATE)
            iks, itn, itm = _sk_next(iks, itn, itm, spt, tiles_n)
            acc = _step_mma(acc, words, zz_cur, s_cur, xb, zero_acc, BLOCK_N, KS, BF16, HAS_ZEROS, OP, ABLATE, ROW)
            if (ABLATE & 4) == 0:  # (the measurement knob leaves the flush out)
                if (cks == spt - 1) | (s == s_hi - 1):  # the end of this program's segment of the tile
                    _sk_flush(acc, ctm * tiles_n + ctn, pid, P, W, spt, tiles_n, M, N, MAXC, nr, mr, part_ptr, cnt_ptr,
                              b_ptr, out_ptr, stride_om, stride_on, HAS_BIAS, BLOCK_N, BLOCK_M, MMA, ABLATE)
                    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
            cks, ctn, ctm = _sk_next(cks, ctn, ctm, spt, tiles_n)
        if (ABLATE & 4) != 0:  # keep the ablated kernel's products alive: a store no launch takes (s_hi >= 0)
            if s_hi < 0:
                gl.store(part_ptr + nr[:, None] * BLOCK_M + mr[None, :], acc)

        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------
def wgr_k_order(ks: int) -> torch.Tensor:
    """[ks] int64: the K offset within a step that the dot's position p holds, k = 32 c + 8 l + 2 s + h + 4 e for
    p = 32 c + 16 s + 8 h + 2 l + e (what A_PERM / X_PERM produce; tests check the two agree)."""
    p = torch.arange(ks)
    return (p // 32) * 32 + ((p // 2) % 4) * 8 + ((p // 16) % 2) * 2 + (p // 8) % 2 + (p % 2) * 4


def _emulate_operand(words: torch.Tensor, ks: int) -> torch.Tensor:
    """The kernel's _unpack_operand on int64 codes: [N, ks / 8] words -> [N, ks] q in the dot's order, by the same
    joins (torch.stack on a new last dim), reshape and A_PERM."""
    n = words.shape[0]
    nib = [torch.bitwise_and(torch.bitwise_right_shift(words, 4 * i), 0xF) for i in range(8)]
    pairs = [torch.stack([nib[i], nib[i + 4]], -1) for i in range(4)]  # _pairs: (nibble i, nibble i + 4)
    j = torch.stack([torch.stack([pairs[0], pairs[1]], -1), torch.stack([pairs[2], pairs[3]], -1)], -1)
    return j.reshape(n, ks // 32, 4, 2, 2, 2).permute(A_PERM).reshape(n, ks)


def wgr_x_dot_ref(x: torch.Tensor) -> torch.Tensor:
    """[M, K] x (K % 32 == 0) in natural order -> a contiguous copy in the dot's K order (the kernel's _x_dot_order
    on every 32-column chunk: reshape, X_PERM)."""
    M, K = x.shape
    return x.reshape(M, K // 32, 4, 2, 2, 2).permute(X_PERM).reshape(M, K).contiguous()


@triton.jit
def _x_dot_kernel(x_ptr, out_ptr, K, stride_xm, stride_xk, BLOCK: tl.constexpr):
    """out[m, p] = x[m, k(p)] over one row's BLOCK columns: p = 32 c + 16 s + 8 h + 2 l + e holds
    k = 32 c + 8 l + 4 e + 2 s + h (wgr_k_order); contiguous stores, loads gathered within 64-byte chunks."""
    m = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    r = p % 32
    k = (p - r) + ((r >> 1) & 3) * 8 + (r & 1) * 4 + ((r >> 4) & 1) * 2 + ((r >> 3) & 1)
    ok = p < K
    tl.store(out_ptr + m * K + p, tl.load(x_ptr + m * stride_xm + k * stride_xk, mask=ok), mask=ok)


def wgr_x_dot(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """wgr_x_dot_ref by one Triton launch (torch's permuted copy took 2.4-3.7 us in a graph at 64 rows), into out
    (contiguous [M, K]) when given."""
    M, K = x.shape
    if not (x.is_cuda or interpreting()):
        return wgr_x_dot_ref(x)
    if out is None:
        out = torch.empty((M, K), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(K))
    _x_dot_kernel[(M, cdiv(K, block))](x, out, K, x.stride(0), x.stride(1), BLOCK=block, num_warps=4)
    return out


def _emulate_x(x: torch.Tensor, ks: int) -> torch.Tensor:
    """The kernel's _x_dot_order: [M, ks] x in natural order -> the dot's order (reshape, X_PERM)."""
    return wgr_x_dot_ref(x)


def wgr_emulate(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain-torch emulation of the kernel's arithmetic (CPU tests): per step of KS = min(group, 128), the dot of
    (q - z) [N, KS] in the order the kernel's unpack produces with x [M, KS] in the order its x^T store produces
    (the same reshapes and permutations), times the group's scale, summed in fp32; bias; rounded to x's dtype."""
    M, K = x.shape
    N = qweight.shape[0]
    ks = min(group_size, 128)
    acc = torch.zeros((N, M), dtype=torch.float32, device=x.device)
    for k0 in range(0, K, ks):
        q = _emulate_operand(qweight[:, k0 // 8:(k0 + ks) // 8].long(), ks).float()
        g = k0 // group_size
        if zeros is not None:  # z rounded to x's dtype, then q - z rounded once (exact for integer zero points)
            a = (q - zeros[:, g].to(x.dtype).float()[:, None]).to(x.dtype).float()
        else:
            a = q - 8.0
        d = a @ _emulate_x(x[:, k0:k0 + ks], ks).float().t()
        acc += d * scales[:, g].float()[:, None]
    if bias is not None:
        acc += bias.float()[:, None]
    return acc.t().to(x.dtype)


def tma_rows_ok(t: torch.Tensor) -> bool:
    """Whether a logical [N, G] tensor (words, scales, zeros) is stored N-contiguous with 16-byte aligned rows, so
    that TMA reads its [G, N] view as it is."""
    return t.stride(0) == 1 and (t.stride(1) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def wgr_supported(x: torch.Tensor, qweight: torch.Tensor, group_size: int) -> Optional[str]:
    """None when the wgr kernel takes this launch, else why not (the caller falls back)."""
    if not HAVE_GLUON:
        return "triton.experimental.gluon is not available"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"x must be float16 / bfloat16 (the dot's operands are 16-bit), got {x.dtype}"
    if group_size < 32:
        return f"group_size must be >= 32 (a step spans 32-column chunks), got {group_size}"
    N = qweight.shape[0]
    if not tma_rows_ok(qweight) or N % 4:
        return "qweight must be N-contiguous with 16-byte aligned rows of its [K / 8, N] view (the TMA box)"
    return None


def int4_wgr_gemm(x, qweight, scales, z, b, out, M, N, K, group_size, split, k_per_split, has_zeros, has_bias,
                  cfg: dict, counters: Optional[torch.Tensor], _ablate: int = 0):
    """Launch the wgr kernel (int4_gemm's dispatch has checked shapes and wgr_supported, and reserved the split-K
    arrival counters; the partial sums' slots are allocated here). `_ablate` (stream-K PARAM_TMA only;
    benchmarks/wgr_ablate.py, never int4_gemm): the kernel with parts of its step left out, to time what they cost;
    its outputs are wrong."""
    bm, bn = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])
    warps = int(cfg.get("num_warps", 4))
    ks = min(group_size, 128)
    if bm not in (8, 16, 32, 64) or bn % (16 * warps) or warps not in (4, 8):
        raise ValueError(f"int4_gemm: impl 'wgr' takes BLOCK_M 8 / 16 / 32 / 64, 4 or 8 warps and BLOCK_N a multiple "
                         f"of 16 x warps, got BLOCK_M={bm} BLOCK_N={bn} num_warps={warps}")
    if k_per_split % ks:
        raise ValueError(f"int4_gemm: impl 'wgr' needs K per split ({k_per_split}) a multiple of {ks}")
    if x.stride(1) != 1:
        x = x.contiguous()
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    desc = TensorDescriptor.from_tensor(qweight.t(), [ks // 8, bn], layout)
    if int(cfg.get("STREAM", 0)):
        return _launch_stream_k(desc, x, scales, z, b, out, M, N, K, group_size, has_zeros, has_bias, cfg, bm, bn,
                                warps, ks, _ablate)
    if split == 1:
        part, counters = out, out  # never touched with SPLIT_K=1
    else:  # the kernel's own slots: cdiv(N, bn) x cdiv(M, bm) tiles x split, each bn x bm in _slot_offsets' order
        part = torch.empty(cdiv(N, bn) * cdiv(M, bm) * split * bn * bm, dtype=torch.float32, device=x.device)
    grid = (cdiv(N, bn), split, cdiv(M, bm))
    _int4_wgr_kernel[grid](
        desc, x, scales, z, b, out, part, counters, M, N, K, k_per_split, split,
        x.stride(0), x.stride(1), scales.stride(0), scales.stride(1), z.stride(0), z.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group_size, HAS_ZEROS=has_zeros, HAS_BIAS=has_bias, SPLIT=split > 1, BLOCK_M=bm, BLOCK_N=bn, KS=ks,
        STAGES=int(cfg.get("num_stages", 4)), num_warps=warps)
    return out


def sk_partition(W: int, P: int, spt: int) -> tuple[list[int], int]:
    """Stream-K bookkeeping (the kernel's, in Python): per tile the number of programs whose step range
    [p W // P, (p + 1) W // P) meets it, and the largest such number (the workspace's MAXC)."""
    def cta_of(s):
        return ((s + 1) * P + W - 1) // W - 1
    counts = [cta_of(t * spt + spt - 1) - cta_of(t * spt) + 1 for t in range(W // spt)]
    return counts, max(counts, default=1)


def _launch_stream_k(w_desc, x, scales, z, b, out, M, N, K, group_size, has_zeros, has_bias, cfg, bm, bn, warps, ks,
                     ablate=0):
    # X_DOT: x permuted into the dot's K order once per call (wgr_x_dot, one copy kernel), so that the ring's x tile
    # is the wgmma's operand as TMA lands it; else every program relabels every step's tile in registers and stores
    # a copy (9 of 38 us at 64 rows, sweeps/wgr_wide_ablate)
    x_dot = bool(int(cfg.get("X_DOT", 0)))
    if x_dot and int(cfg.get("WS", 0)):
        raise ValueError("int4_gemm: impl 'wgr' takes X_DOT without WS only")
    if x_dot:
        x = wgr_x_dot(x)
    if not x.is_contiguous() or x.data_ptr() % 16:  # the x tiles' TMA: K % 8 == 0, so rows are 16-byte aligned
        x = torch.empty((M, K), dtype=x.dtype, device=x.device).copy_(x)
    x_desc = TensorDescriptor.from_tensor(x, [bm, ks], gl.NVMMASharedLayout.get_default_for([bm, ks], _GL_DTYPE[x.dtype]))
    # PARAM_TMA: scales and zeros through the ring too (each TMA copy costs the loop a CTA barrier: Gluon orders
    # the ops on a slot's mbarrier with bar.sync); else register loads two steps ahead
    param_tma = bool(int(cfg.get("PARAM_TMA", 0)))
    s_desc = _row_desc(scales, bn) if param_tma else x_desc
    z_desc = _row_desc(z, bn) if param_tma and has_zeros else s_desc
    tiles_n, tiles_m = cdiv(N, bn), cdiv(M, bm)
    spt = cdiv(K, ks)
    W = tiles_n * tiles_m * spt
    P = max(1, min(W, int(cfg.get("CTAS_PER_SM", 3)) * sm_count(x.device)))
    # the most programs one tile can meet: a tile's spt steps over ranges of >= W // P steps each
    maxc = min(P, cdiv(spt, max(1, W // P)) + 1)
    part = torch.empty((tiles_n * tiles_m, maxc, bn * bm), dtype=torch.float32, device=x.device)
    counters = arrival_counters(x.device, tiles_n * tiles_m)
    if ablate and (int(cfg.get("WS", 0)) or not param_tma):
        raise ValueError("wgr ablation: stream-K PARAM_TMA configs only")
    if int(cfg.get("WS", 0)):
        _int4_wgr_ws_kernel[(P,)](
            w_desc, x_desc, _row_desc(scales, bn), _row_desc(z, bn) if has_zeros else x_desc, b, out, part, counters,
            M, N, K, W, spt, tiles_n, maxc, out.stride(0), out.stride(1),
            GROUP=group_size, HAS_ZEROS=has_zeros, HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, KS=ks,
            STAGES=int(cfg.get("num_stages", 4)), NUM_WARPS=warps, num_warps=warps,
            # The register file shared by CTAS_PER_SM programs. Triton pads the one-warp producer partition to a
            # warpgroup (8 warps a program) and gives the consumers 2 maxnreg - 24 by setmaxnreg; without maxnreg
            # they would take 248 a thread and one program would fill an SM.
            maxnreg=max(64, min(128, 65536 // (int(cfg.get("CTAS_PER_SM", 3)) * 32 * (warps + 4)) // 8 * 8)))
        return out
    _int4_wgr_sk_kernel[(P,)](
        w_desc, x_desc, s_desc, z_desc, scales, z, b, out, part, counters, M, N, K, W, spt, tiles_n, maxc,
        scales.stride(0), scales.stride(1), z.stride(0), z.stride(1), out.stride(0), out.stride(1),
        GROUP=group_size, HAS_ZEROS=has_zeros, HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, KS=ks,
        STAGES=int(cfg.get("num_stages", 4)), PARAM_TMA=param_tma, ABLATE=ablate,
        X_DOT=x_dot, num_warps=warps)
    return out


_GL_DTYPE = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16} if HAVE_GLUON else {}


def _row_desc(t: torch.Tensor, bn: int, rows: int = 1):
    """TMA descriptor of per-group rows (scales or zeros, logical [N, K / g]) as [K / g, N] boxes of [rows, bn]; a
    copy in that storage when the tensor is not already N-contiguous with 16-byte aligned rows (a cost per call)."""
    v = t.t()
    if not tma_rows_ok(t):
        n = v.shape[1]
        pad = -(-n * v.element_size() // 16) * 16 // v.element_size()
        v = torch.zeros((v.shape[0], pad), dtype=v.dtype, device=v.device)[:, :n].copy_(v)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=v.element_size() * 8, rank=2)
    return TensorDescriptor(v, list(v.shape), list(v.stride()), [rows, bn], layout)
