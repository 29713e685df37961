"""INT4 weight-only GEMM for 1..16 rows of x on Hopper, written in Gluon: ``ldmma`` (words loaded straight into
mma.sync's registers, whole K per program).

y[M, N] = x[M, K] @ dequant(qweight, scales, zeros)[N, K].T (+ bias), kernopt's int4 format (kernels/int4_gemm.py:
N-contiguous int32 words, nibble i of word j is k = 8 j + i), 16-bit x.

Why another small-M kernel: the two it competes with spend their time outside the product. The PAIRS GEMV (M = 1)
does its math in packed bf16x2 ALU work, ~26-31 instructions a word (11 of them on the integer pipe), and holds its
bytes in flight in registers it also needs for that math; wgr (M = 2..16) lands the words in shared memory by TMA
and reads them back (64 % of its shared-memory wavefronts were bank conflicts), then pays a cross-program flush
(2.5-3.9 us at K4096 N14336 / K14336 N4096, its stream-K tail). This kernel does neither:

- **Swap-AB on mma.sync.** out^T [32, BLOCK_M] = W [32, K] @ x^T [K, BLOCK_M] per program: the weight is the A
  operand (m16n8k16, registers), x's rows are the MMA's N (8, or 16 as two MMA columns). Each lane's A fragment of
  a 32-wide K chunk is one whole word per row it owns, so one LDG.128 gives a lane four rows' words.
- **Words by plain global loads in the operand's own layout**: lane t of a warp holds word row t % 4 (+ 4 c) of
  columns 4 (t // 4) .. + 3 (16 contiguous bytes), and the 32 columns of a program are relabelled (n = 16 a + 8 b +
  r for physical column 4 r + 2 a + b) so that the unpacked tile *is* the MMA's A layout (asserted trivial at
  compile time): no shared memory, no shuffle. The unpack is wgr's (``lop3`` of a 16-bit float exponent onto
  nibbles i, i + 4, a packed subtraction to q - z: kernels/int4_wgmma.py), in wgr's K order within a chunk.
- **Whole K per program, warps split K.** A program owns 32 columns; its W warps take the K chunks round robin
  (chunk c -> warp c % W), each into its own accumulator (a batched MMA: warp = batch), summed across warps once at
  the end. No split-K partials, no arrival counters, no second pass: N / 32 programs (448 at N = 14336, 128 at
  N = 4096), W chosen so that the SM has enough loads in flight.
- Each warp's next chunk (words, x, scale, zero) is loaded before the current one is unpacked (two chunks a loop
  iteration, so that the two register buffers alternate without copies; AHEAD=2: two chunks ahead, three buffers).
  Where every warp's chunks and every column exist (EVEN_K / EVEN_N) the loads are unmasked; x rows past M read row
  M - 1 (their MMA columns are never stored). 16.6 SASS instructions a word at M = 1 with symmetric weights, 21.5
  with zero points (offline sm_90a, benchmarks/sass_loop.py; 12 / 16 of them the unpack and MMA), 96 / 104
  registers at 4 warps.

Measured on the H200 (bf16 x, group 128, the suite's harness; sweeps/ldmma1..6, ldmma_table, ldmma_ablate): faster
than the table before at K = 4096 with M <= 8 (K4096 N14336 M=1 / 4 / 8: 14.09 / 14.46 / 14.67 us with zero points
against 15.70 / 16.00 / 16.09; 4096^2 7.42 / 7.73 / 8.03 against 7.69 / 9.86 / 9.93), the table's pick there
(int4_gemm._ldmma_pick); a tie at K14336 N4096 (one 16-warp program per 32 columns: 16.06 against 15.86) and slower
at 16 rows (two waves at N = 14336: 168 registers). Far from the 3x bf16 cuBLAS bar (10.3 us at K4096 N14336): the
loads alone (words and scales, ABLATE 2: no x, unpack or MMA) take 11.74 / 10.92 us (zero points / symmetric), so
the load structure bounds it, not the math (the unpack and MMA add 2.4 / 1.5 us). What did not help: 2-3 chunks in
flight per warp (AHEAD 2 and the earlier PREFETCH, with their extra registers), 64- or 16-column programs, chunks of
64 or 32; the words in a tiled format (ldmma_tile, a program's words one contiguous block: 2-5 %, sweeps/
ldmma_layouts) and landed by TMA in a shared-memory ring (_int4_ldmma_ring_kernel, STAGES: slower everywhere, its
loads alone no faster, sweeps/ldmma_ring_ablate). Plain Triton reads of the same words in this grid take 8.99 us at
K4096 N14336 (benchmarks/read_probe.py): what is left above that is the unpack / MMA chains with 3.4 warps per
scheduler, and at N = 4096 the grid itself (128 programs: 12.3 us at K14336, where 4-way split-K reads in 9.0):
SPLIT_K (programs per column block, each a contiguous K slice, the last to arrive summing their slots) is built for
that: 4 ways at K14336 N4096 M=1 / 4 / 8 13.71 / 14.14 / 14.99 us against the table's 16.02 / 17.24 / 17.40 (the
table's pick there since), no faster at 4096^2 (7.76 against 7.30; sweeps/ldmma_split).

No interpreter: Gluon kernels do not run under TRITON_INTERPRET. On CPU `ldmma_emulate` repeats the kernel's
relabelling (joins, reshapes, permutations) in torch against the reference, and tests/kernels/sm90_offline.py
compiles the kernel for sm_90a (the layout conversions asserted trivial, registers, spills); the GPU tests (marked
gpu) check it against the dequantized reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from .host import cdiv
from .int4_wgmma import HAVE_GLUON
from .workspace import arrival_counters

if HAVE_GLUON:
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .int4_wgmma import _RAW_PAIR, _operand_pairs, _pairs, _slots_finish, _zero_pairs, gl, gluon

# The relabelling, as the kernel does it (ldmma_emulate repeats these exact ops on CPU). A program's BN columns are
# 8 lanes x CPL = BN / 8 consecutive columns; physical column CPL r + 2 a + b (lane r) is MMA row 16 a + 8 b + r.
# Words [W, RW, BN] unpacked to [W, RW, BN, e, h, s] (nibble 2 s + h + 4 e, int4_wgmma._word_pairs) are viewed as
# [W, KB, C, R, A, B, E, H, S] (word row 4 kb + c) and A_PERM makes them [W, A, B, R, KB, S, H, C, E]: MMA row
# 16 a + 8 b + r, dot position p = 32 kb + 16 s + 8 h + 2 c + e (wgr's order within a chunk).
# x [W, BM, KS] in natural order, k = 32 kb + 8 c + 4 e + 2 s + h, viewed as [W, BM, KB, C, E, S, H]; X_PERM makes it
# [W, KB, S, H, C, E, BM]: the same positions p. Scales [W, BN] loaded per physical column, viewed as [W, R, A, B];
# S_PERM makes them [W, A, B, R]: per MMA row.
A_PERM = (0, 4, 5, 3, 1, 8, 7, 2, 6)
X_PERM = (0, 2, 5, 6, 3, 4, 1)
S_PERM = (0, 2, 3, 1)


def column_of_row(n: torch.Tensor, block_n: int = 32) -> torch.Tensor:
    """The physical column (within a program's block_n) of MMA row n: row 16 a + 8 b + r holds column
    (block_n / 8) r + 2 a + b."""
    return (block_n // 8) * (n % 8) + 2 * (n // 16) + (n // 8) % 2


if HAVE_GLUON:
    _A_PERM = gl.constexpr(list(A_PERM))
    _X_PERM = gl.constexpr(list(X_PERM))
    _S_PERM = gl.constexpr(list(S_PERM))
    _ROW_ORDER = gl.constexpr([0, 1, 4, 2, 3, 5, 6, 7, 8])
    _ROW_ORDER_X = gl.constexpr([0, 1, 2, 5, 3, 4, 6])

    @gluon.constexpr_function
    def _log2(v):
        return v.bit_length() - 1

    @gluon.constexpr_function
    def _ld_layouts(W, RW, BM, BN, ROWS=0):
        """(WL, XL, MMA, OPA, OPB): the [W, RW, BN] word tile (lane t: word row t % 4 (+ 4 c, registers), columns
        CPL (t // 4) .. + CPL - 1, CPL = BN / 8; warp w: its own chunk), the [W, BM, KS] natural-order x tile (lane
        t: row t // 4, k 8 (t % 4) .. + 7 of each 32), the batched mma.sync accumulator (a warp per batch) and its
        two operands. ROWS 1 (RW >= 8): lane t holds word rows 2 (t % 4) + (c % 2) + 8 (c // 2) instead, so that
        the 8 lanes of a 16-byte shared-memory load phase read rows 0, 2, 4, 6 (or 1, 3, 5, 7) of two adjacent
        16-byte columns: distinct banks under the 128-byte swizzle (_ROW_ORDER; the K order follows in x)."""
        cpl = BN // 8
        rows_lane, rows_reg = ([2, 4], [1] + [1 << b for b in range(3, _log2(RW))]) if ROWS else \
            ([1, 2], [1 << b for b in range(2, _log2(RW))])
        reg = [[0, 0, 1 << b] for b in range(_log2(cpl))] + [[0, r, 0] for r in rows_reg]
        lane = [[0, rows_lane[0], 0], [0, rows_lane[1], 0], [0, 0, cpl], [0, 0, 2 * cpl], [0, 0, 4 * cpl]]
        warp = [[1 << b, 0, 0] for b in range(_log2(W))]
        wl = gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lane, warp_bases=warp, block_bases=[],
                                        shape=[W, RW, BN])
        ks = RW * 8
        xreg = [[0, 0, 1], [0, 0, 2], [0, 0, 4]] + [[0, 0, 8 * r] for r in rows_reg]
        xreg += [[0, 1 << b, 0] for b in range(3, _log2(BM))]
        xl = gl.DistributedLinearLayout(reg_bases=xreg, lane_bases=[[0, 0, 8 * rows_lane[0]], [0, 0, 8 * rows_lane[1]],
                                                                    [0, 1, 0], [0, 2, 0], [0, 4, 0]],
                                        warp_bases=warp, block_bases=[], shape=[W, BM, ks])
        mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
        return (wl, xl, mma, gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
                gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2))

    @gluon.jit
    def _ld_operand_a(w, zz, W: gl.constexpr, BN: gl.constexpr, KS: gl.constexpr, BF16: gl.constexpr,
                      HAS_ZEROS: gl.constexpr, OPA: gl.constexpr, ABLATE: gl.constexpr = 0, ROWS: gl.constexpr = 0):
        """[W, KS / 8, BN] words -> [W, BN, KS] (q - z), the MMA's A operand (rows relabelled, K in wgr's order).
        ABLATE 1 (benchmarks/ldmma_ablate.py only: wrong values): each word's bits as all four of its pairs."""
        if ABLATE == 1:
            p = _pairs(w, w, _RAW_PAIR, BF16)
            j = gl.join(gl.join(p, p), gl.join(p, p))
        else:
            j = _operand_pairs(w, zz, BF16, HAS_ZEROS)
        if ROWS:  # word row 8 jh + 4 j2 + 2 j1 + j0 -> (KB, C) = (2 jh + j0, 2 j2 + j1): the lanes' rows (_ld_layouts)
            j = gl.reshape(j, [W, KS // 64, 2, 2, 2, BN, 2, 2, 2])       # [W, JH, J2, J1, J0, BN, E, H, S]
            j = gl.permute(j, _ROW_ORDER.value)                           # [W, JH, J0, J2, J1, BN, E, H, S]
        j = gl.reshape(j, [W, KS // 32, 4, 8, BN // 16, 2, 2, 2, 2])  # [W, KB, C, R, A, B, E, H, S]
        j = gl.permute(j, _A_PERM.value)                              # [W, A, B, R, KB, S, H, C, E]
        return gl.convert_layout(gl.reshape(j, [W, BN, KS]), OPA, assert_trivial=True)

    @gluon.jit
    def _ld_operand_b(xv, W: gl.constexpr, BM: gl.constexpr, KS: gl.constexpr, OPB: gl.constexpr,
                      ROWS: gl.constexpr = 0):
        """[W, BM, KS] x in natural K order -> [W, KS, BM] in the dot's order, the MMA's B operand (registers
        relabelled within each lane; ROWS: the word rows' order of _ld_operand_a)."""
        if ROWS:
            t = gl.reshape(xv, [W, BM, KS // 64, 2, 2, 2, 8])  # [W, BM, JH, J2, J1, J0, I]
            xv = gl.permute(t, _ROW_ORDER_X.value)              # [W, BM, JH, J0, J2, J1, I]
        t = gl.reshape(xv, [W, BM, KS // 32, 4, 2, 2, 2])  # [W, BM, KB, C, E, S, H]
        t = gl.permute(t, _X_PERM.value)                     # [W, KB, S, H, C, E, BM]
        return gl.convert_layout(gl.reshape(t, [W, KS, BM]), OPB)

    @gluon.jit
    def _ld_rows(v, W: gl.constexpr, BN: gl.constexpr, SL: gl.constexpr):
        """[W, BN] per physical column (word layout) -> per MMA row (the accumulator's rows)."""
        t = gl.permute(gl.reshape(v, [W, 8, BN // 16, 2]), _S_PERM.value)  # [W, R, A, B] -> [W, A, B, R]
        return gl.convert_layout(gl.reshape(t, [W, BN]), SL)

    @gluon.jit
    def _ld_side(x_ptr, s_ptr, z_ptr, ch, NCH, xm, xk, zn, n_ok, stride_xm, stride_xk, stride_sn, stride_sg,
                 stride_zn, stride_zg, GROUP: gl.constexpr, KS: gl.constexpr, HAS_ZEROS: gl.constexpr,
                 EVEN_N: gl.constexpr, EVEN_K: gl.constexpr, XL: gl.constexpr, ZL: gl.constexpr, live=True):
        """Warp w's chunk ch[w] but its words: x [W, BM, KS] and its group's scales and zeros [W, BN] per physical
        column; chunks past NCH load zeros (EVEN_K: every warp's chunk exists, no mask; EVEN_N: no column past N).
        live (a scalar, the same for every warp): False loads nothing (a prefetch past the last step)."""
        chx = gl.convert_layout(ch, gl.SliceLayout(1, gl.SliceLayout(2, XL)))
        xp = x_ptr + xm[None, :, None] * stride_xm + ((chx * KS)[:, None, None] + xk[None, None, :]) * stride_xk
        chz = gl.convert_layout(ch, gl.SliceLayout(1, ZL))
        gz = (chz * KS) // GROUP
        sp = s_ptr + gz[:, None] * stride_sg + zn[None, :] * stride_sn
        zp = z_ptr + gz[:, None] * stride_zg + zn[None, :] * stride_zn
        okz = gl.full([ch.shape[0], zn.shape[0]], 1, gl.int1, ZL)
        if not EVEN_K:
            okz = okz & (chz < NCH)[:, None]
        if not EVEN_N:
            okz = okz & n_ok[None, :]
        if EVEN_K and EVEN_N:
            sv = gl.load(sp, mask=live)
        else:
            sv = gl.load(sp, mask=okz & live, other=0.0)
        if EVEN_K:  # (rows past M read row M - 1: their MMA columns are never stored)
            xv = gl.load(xp, mask=live)
        else:
            xv = gl.load(xp, mask=(chx < NCH)[:, None, None] & live, other=0.0)
        if HAS_ZEROS:
            if EVEN_K and EVEN_N:
                zv = gl.load(zp, mask=live)
            else:
                zv = gl.load(zp, mask=okz & live, other=0.0)
        else:
            zv = gl.zeros([ch.shape[0], zn.shape[0]], gl.float32, layout=ZL)
        return xv, sv, zv

    @gluon.jit
    def _ld_chunk(q_ptr, x_ptr, s_ptr, z_ptr, ch, NCH, qn, qj, xm, xk, zn, n_ok,
                  stride_qk, stride_xm, stride_xk, stride_sn, stride_sg, stride_zn, stride_zg,
                  GROUP: gl.constexpr, KS: gl.constexpr, HAS_ZEROS: gl.constexpr, EVEN_N: gl.constexpr,
                  EVEN_K: gl.constexpr, WL: gl.constexpr, XL: gl.constexpr, ZL: gl.constexpr, live=True):
        """One step's loads for every warp: warp w's chunk ch[w] (words [W, RW, BN] by plain loads, and _ld_side's
        x, scales, zeros); chunks past NCH load zeros."""
        RW: gl.constexpr = KS // 8
        chw = gl.convert_layout(ch, gl.SliceLayout(1, gl.SliceLayout(2, WL)), assert_trivial=True)
        wp = q_ptr + (chw * RW)[:, None, None] * stride_qk + qj[None, :, None] * stride_qk + qn[None, None, :]
        if EVEN_K and EVEN_N:
            wv = gl.load(wp, mask=live)
        else:
            okw = gl.full([ch.shape[0], RW, zn.shape[0]], 1, gl.int1, WL)
            if not EVEN_K:
                okw = okw & (chw < NCH)[:, None, None]
            if not EVEN_N:
                okw = okw & n_ok[None, None, :]
            wv = gl.load(wp, mask=okw & live, other=0)
        xv, sv, zv = _ld_side(x_ptr, s_ptr, z_ptr, ch, NCH, xm, xk, zn, n_ok, stride_xm, stride_xk, stride_sn,
                              stride_sg, stride_zn, stride_zg, GROUP, KS, HAS_ZEROS, EVEN_N, EVEN_K, XL, ZL, live)
        return wv, xv, sv, zv

    @gluon.jit
    def _ld_step(acc, zero_acc, wv, xv, sv, zv, W: gl.constexpr, BN: gl.constexpr, KS: gl.constexpr,
                 BM: gl.constexpr, BF16: gl.constexpr, HAS_ZEROS: gl.constexpr, OPA: gl.constexpr,
                 OPB: gl.constexpr, SL: gl.constexpr, ABLATE: gl.constexpr = 0, ROWS: gl.constexpr = 0):
        """acc += one chunk's product per warp, scaled per MMA row (ROWS: the word rows' order, _ld_layouts).
        ABLATE (benchmarks/ldmma_ablate.py only, wrong values): 1 no unpack (the word bits go to the MMA), 2 neither
        unpack nor MMA nor x (the words summed per column stand in for the product)."""
        if ABLATE == 2:
            t = gl.sum(wv, axis=1).to(gl.float32) + zv.to(gl.float32)
            return acc + (_ld_rows(t, W, BN, SL) * _ld_rows(sv.to(gl.float32), W, BN, SL))[:, :, None]
        zz = _zero_pairs(zv, HAS_ZEROS, BF16)
        a = _ld_operand_a(wv, zz[:, None, :], W, BN, KS, BF16, HAS_ZEROS, OPA, ABLATE, ROWS)
        b = _ld_operand_b(xv, W, BM, KS, OPB, ROWS)
        d = mma_v2(a, b, zero_acc)
        return acc + d * _ld_rows(sv.to(gl.float32), W, BN, SL)[:, :, None]

    @gluon.jit
    def _int4_ldmma_kernel(
        q_ptr, x_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
        M, N, NCH, CPS,
        stride_qt, stride_qn, stride_qk, stride_xm, stride_xk, stride_sn, stride_sg, stride_zn, stride_zg, stride_om,
        stride_on, GROUP: gl.constexpr, KS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, HAS_ZEROS: gl.constexpr,
        HAS_BIAS: gl.constexpr, EVEN_N: gl.constexpr, EVEN_K: gl.constexpr, AHEAD: gl.constexpr = 1,
        SPLIT_K: gl.constexpr = 1, ABLATE: gl.constexpr = 0,
    ):
        """SPLIT_K > 1: program (pid_n, pid_m, pid_k) takes chunks pid_k CPS .. + CPS - 1 of its columns' K, stores
        its partial in the tile's workspace slot and the last of the tile's programs to arrive sums them
        (_ld_store_split); more, shorter programs where N / BN programs leave SMs idle (128 at N = 4096)."""
        W: gl.constexpr = gl.num_warps()
        RW: gl.constexpr = KS // 8
        BF16: gl.constexpr = x_ptr.dtype.element_ty == gl.bfloat16
        LAYOUTS: gl.constexpr = _ld_layouts(W, RW, BM, BN)
        WL: gl.constexpr = LAYOUTS[0]
        XL: gl.constexpr = LAYOUTS[1]
        MMA: gl.constexpr = LAYOUTS[2]
        OPA: gl.constexpr = LAYOUTS[3]
        OPB: gl.constexpr = LAYOUTS[4]
        SL: gl.constexpr = gl.SliceLayout(2, MMA)  # [W, BN]: per MMA row
        ZL: gl.constexpr = gl.SliceLayout(1, WL)   # [W, BN]: per physical column (the words' layout)

        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_k = gl.program_id(2)
        if SPLIT_K == 1:  # (the unsplit kernel stays as measured: no slice bookkeeping)
            c_lo = 0
        else:
            c_lo = pid_k * CPS
            NCH = gl.minimum(NCH, c_lo + CPS)  # this program's chunks: c_lo .. NCH - 1 (the masks' bound)
        n0 = pid_n * BN
        # program pid_n's words start at pid_n * stride_qt (BN columns on: BN * stride_qn in the N-contiguous format,
        # one tile in the tiled one, ldmma_tile)
        qn = pid_n * stride_qt + gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(1, WL))) * stride_qn
        qj = gl.arange(0, RW, layout=gl.SliceLayout(0, gl.SliceLayout(2, WL)))
        zn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, ZL))
        n_ok = zn < N
        xm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, gl.SliceLayout(2, XL)))
        xk = gl.arange(0, KS, layout=gl.SliceLayout(0, gl.SliceLayout(1, XL)))
        xm = gl.minimum(xm, M - 1)  # rows past M read row M - 1 (no masks): their MMA columns are never stored

        # warp w takes chunks w, w + W, ...: the next one's loads in flight while one is unpacked and multiplied.
        # Two steps per iteration (buffers 0 and 1 alternate: no register copies), the last one or two peeled so
        # that no load runs past the warp's last chunk.
        ch = c_lo + gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, WL)))
        steps = gl.cdiv(NCH - c_lo, W)
        w0, x0, s0, z0 = _ld_chunk(q_ptr, x_ptr, s_ptr, z_ptr, ch, NCH, qn, qj, xm, xk, zn, n_ok, stride_qk,
                                   stride_xm, stride_xk, stride_sn, stride_sg, stride_zn, stride_zg, GROUP, KS,
                                   HAS_ZEROS, EVEN_N, EVEN_K, WL, XL, ZL)
        acc = gl.zeros([W, BN, BM], gl.float32, layout=MMA)
        zero_acc = gl.zeros([W, BN, BM], gl.float32, layout=MMA)
        for i in range((steps - 1) // 2 if AHEAD == 1 else 0):
            w1, x1, s1, z1 = _ld_chunk(q_ptr, x_ptr, s_ptr, z_ptr, ch + W, NCH, qn, qj, xm, xk, zn, n_ok,
                                       stride_qk, stride_xm, stride_xk, stride_sn, stride_sg, stride_zn, stride_zg,
                                       GROUP, KS, HAS_ZEROS, EVEN_N, EVEN_K, WL, XL, ZL)
            acc = _ld_step(acc, zero_acc, w0, x0, s0, z0, W, BN, KS, BM, BF16, HAS_ZEROS, OPA, OPB, SL, ABLATE)
            w0, x0, s0, z0 = _ld_chunk(q_ptr, x_ptr, s_ptr, z_ptr, ch + 2 * W, NCH, qn, qj, xm, xk, zn, n_ok,
                                       stride_qk, stride_xm, stride_xk, stride_sn, stride_sg, stride_zn, stride_zg,
                                       GROUP, KS, HAS_ZEROS, EVEN_N, EVEN_K, WL, XL, ZL)
            acc = _ld_step(acc, zero_acc, w1, x1, s1, z1, W, BN, KS, BM, BF16, HAS_ZEROS, OPA, OPB, SL, ABLATE)
            ch = ch + 2 * W
        if AHEAD == 2:
            # Two chunks ahead: three buffers in turn, three steps per iteration; a step past the last one is
            # skipped (a uniform branch) and its prefetch loads nothing.
            w1, x1, s1, z1 = _ld_chunk(q_ptr, x_ptr, s_ptr, z_ptr, ch + W, NCH, qn, qj, xm, xk, zn, n_ok,
                                       stride_qk, stride_xm, stride_xk, stride_sn, stride_sg, stride_zn, stride_zg,
                                       GROUP, KS, HAS_ZEROS, EVEN_N, EVEN_K, WL, XL, ZL, steps > 1)
            for i in range(gl.cdiv(steps, 3)):
                t = 3 * i
                w2, x2, s2, z2 = _ld_chunk(q_ptr, x_ptr, s_ptr, z_ptr, ch + 2 * W, NCH, qn, qj, xm, xk, zn, n_ok,
                                           stride_qk, stride_xm, stride_xk, stride_sn, stride_sg, stride_zn,
                                           stride_zg, GROUP, KS, HAS_ZEROS, EVEN_N, EVEN_K, WL, XL, ZL, t + 2 < steps)
                acc = _ld_step(acc, zero_acc, w0, x0, s0, z0, W, BN, KS, BM, BF16, HAS_ZEROS, OPA, OPB, SL, ABLATE)
                w0, x0, s0, z0 = _ld_chunk(q_ptr, x_ptr, s_ptr, z_ptr, ch + 3 * W, NCH, qn, qj, xm, xk, zn, n_ok,
                                           stride_qk, stride_xm, stride_xk, stride_sn, stride_sg, stride_zn,
                                           stride_zg, GROUP, KS, HAS_ZEROS, EVEN_N, EVEN_K, WL, XL, ZL, t + 3 < steps)
                if t + 1 < steps:
                    acc = _ld_step(acc, zero_acc, w1, x1, s1, z1, W, BN, KS, BM, BF16, HAS_ZEROS, OPA, OPB, SL, ABLATE)
                w1, x1, s1, z1 = _ld_chunk(q_ptr, x_ptr, s_ptr, z_ptr, ch + 4 * W, NCH, qn, qj, xm, xk, zn, n_ok,
                                           stride_qk, stride_xm, stride_xk, stride_sn, stride_sg, stride_zn,
                                           stride_zg, GROUP, KS, HAS_ZEROS, EVEN_N, EVEN_K, WL, XL, ZL, t + 4 < steps)
                if t + 2 < steps:
                    acc = _ld_step(acc, zero_acc, w2, x2, s2, z2, W, BN, KS, BM, BF16, HAS_ZEROS, OPA, OPB, SL, ABLATE)
                ch = ch + 3 * W
        elif (steps - 1) % 2 == 1:  # two steps left
            w1, x1, s1, z1 = _ld_chunk(q_ptr, x_ptr, s_ptr, z_ptr, ch + W, NCH, qn, qj, xm, xk, zn, n_ok,
                                       stride_qk, stride_xm, stride_xk, stride_sn, stride_sg, stride_zn, stride_zg,
                                       GROUP, KS, HAS_ZEROS, EVEN_N, EVEN_K, WL, XL, ZL)
            acc = _ld_step(acc, zero_acc, w0, x0, s0, z0, W, BN, KS, BM, BF16, HAS_ZEROS, OPA, OPB, SL, ABLATE)
            acc = _ld_step(acc, zero_acc, w1, x1, s1, z1, W, BN, KS, BM, BF16, HAS_ZEROS, OPA, OPB, SL, ABLATE)
        else:
            acc = _ld_step(acc, zero_acc, w0, x0, s0, z0, W, BN, KS, BM, BF16, HAS_ZEROS, OPA, OPB, SL, ABLATE)

        if SPLIT_K == 1:
            _ld_store(acc, b_ptr, out_ptr, M, N, n0, pid_m * BM, stride_om, stride_on, BN, BM, HAS_BIAS, MMA)
        else:
            _ld_store_split(acc, part_ptr, cnt_ptr, pid_m * gl.num_programs(0) + pid_n, pid_k, b_ptr, out_ptr, M, N,
                            n0, pid_m * BM, stride_om, stride_on, BN, BM, HAS_BIAS, MMA, SPLIT_K)

    @gluon.jit
    def _ld_store_split(acc, part_ptr, cnt_ptr, tile, pid_k, b_ptr, out_ptr, M, N, n0, m0, stride_om, stride_on,
                        BN: gl.constexpr, BM: gl.constexpr, HAS_BIAS: gl.constexpr, MMA: gl.constexpr,
                        SPLIT_K: gl.constexpr):
        """Split-K's finish: this K slice's [BN, BM] sum into slot pid_k of the tile's SPLIT_K fp32 slots, an
        acq_rel arrival on the tile's counter (kernels/workspace.py); the last program to arrive sums the slots,
        re-arms the counter and writes the tile (_ld_write)."""
        TL: gl.constexpr = gl.SliceLayout(0, MMA)
        offs = gl.arange(0, BN, layout=gl.SliceLayout(1, TL))[:, None] * BM + \
            gl.arange(0, BM, layout=gl.SliceLayout(0, TL))[None, :]
        base = part_ptr + tile.to(gl.int64) * (SPLIT_K * BN * BM)
        total, last = _slots_finish(gl.sum(acc, axis=0), base, offs, pid_k, SPLIT_K, cnt_ptr, tile, BN * BM)
        if last:
            _ld_write(total, b_ptr, out_ptr, M, N, n0, m0, stride_om, stride_on, BN, BM, HAS_BIAS, MMA)

    @gluon.jit
    def _ld_store(acc, b_ptr, out_ptr, M, N, n0, m0, stride_om, stride_on, BN: gl.constexpr, BM: gl.constexpr,
                  HAS_BIAS: gl.constexpr, MMA: gl.constexpr):
        """The warps' K chunks summed, written (_ld_write)."""
        _ld_write(gl.sum(acc, axis=0), b_ptr, out_ptr, M, N, n0, m0, stride_om, stride_on, BN, BM, HAS_BIAS, MMA)

    @gluon.jit
    def _ld_write(total, b_ptr, out_ptr, M, N, n0, m0, stride_om, stride_on, BN: gl.constexpr, BM: gl.constexpr,
                  HAS_BIAS: gl.constexpr, MMA: gl.constexpr):
        """[BN, BM] sums (+ bias), MMA rows written back to their physical columns."""
        TL: gl.constexpr = gl.SliceLayout(0, MMA)
        on = gl.arange(0, BN, layout=gl.SliceLayout(1, TL))
        on = n0 + (BN // 8) * (on % 8) + 2 * (on // 16) + (on // 8) % 2
        om = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, TL))
        on_ok = on < N
        if HAS_BIAS:
            total += gl.load(b_ptr + on, mask=on_ok, other=0.0).to(gl.float32)[:, None]
        gl.store(out_ptr + om[None, :] * stride_om + on[:, None] * stride_on, total.to(out_ptr.dtype.element_ty),
                 mask=on_ok[:, None] & (om < M)[None, :])

    @gluon.jit
    def _int4_ldmma_ring_kernel(
        w_desc, x_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
        M, N, NCH, KW,
        stride_xm, stride_xk, stride_sn, stride_sg, stride_zn, stride_zg, stride_om, stride_on,
        GROUP: gl.constexpr, KS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, HAS_ZEROS: gl.constexpr,
        HAS_BIAS: gl.constexpr, EVEN_N: gl.constexpr, EVEN_K: gl.constexpr, TILED: gl.constexpr,
        STAGES: gl.constexpr, ROWS: gl.constexpr = 0, SPS: gl.constexpr = 1, ABLATE: gl.constexpr = 0,
    ):
        """_int4_ldmma_kernel with the words landed by TMA in a STAGES-deep shared-memory ring (a slot: the W
        warps' chunks of one step, W x KS / 8 word rows x BN columns, 128-byte swizzled) and read back by each
        warp in its A fragment's layout; x, scales and zeros by plain loads one step ahead. Bytes in flight cost
        no registers. TILED: the words in ldmma_tile's format (w_desc over its [N / BN * K / 8, BN] view). ROWS 1:
        the lanes' word rows chosen so that the shared-memory reads are free of bank conflicts (_ld_layouts). SPS 2:
        a slot holds two steps (one barrier, TMA and wait per two steps)."""
        W: gl.constexpr = gl.num_warps()
        RW: gl.constexpr = KS // 8
        BF16: gl.constexpr = x_ptr.dtype.element_ty == gl.bfloat16
        LAYOUTS: gl.constexpr = _ld_layouts(W, RW, BM, BN, ROWS)
        WL: gl.constexpr = LAYOUTS[0]
        XL: gl.constexpr = LAYOUTS[1]
        MMA: gl.constexpr = LAYOUTS[2]
        OPA: gl.constexpr = LAYOUTS[3]
        OPB: gl.constexpr = LAYOUTS[4]
        SL: gl.constexpr = gl.SliceLayout(2, MMA)
        ZL: gl.constexpr = gl.SliceLayout(1, WL)

        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        n0 = pid_n * BN
        zn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, ZL))
        n_ok = zn < N
        xm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, gl.SliceLayout(2, XL)))
        xk = gl.arange(0, KS, layout=gl.SliceLayout(0, gl.SliceLayout(1, XL)))
        xm = gl.minimum(xm, M - 1)
        if TILED:  # program pid_n's tile: rows pid_n * KW .. + KW - 1 of the [N / BN * K / 8, BN] view
            r0 = pid_n * KW
            c0 = 0
        else:      # the N-contiguous words' [K / 8, N] view: columns n0 .. + BN - 1
            r0 = 0
            c0 = n0

        # a slot: SPS steps (SPS W chunks, one TMA box); one barrier, one refill and one wait per slot
        SLOT: gl.constexpr = SPS * W * RW
        w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, SLOT, BN], w_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()
        steps = gl.cdiv(NCH, W)
        slots = gl.cdiv(steps, SPS)
        for i in gl.static_range(STAGES - 1):  # the ring's first STAGES - 1 slots
            ok = i < slots
            mbarrier.expect(bars.index(i), w_desc.block_type.nbytes, pred=ok)
            tma.async_copy_global_to_shared(w_desc, [r0 + i * SLOT, c0], bars.index(i), w_smem.index(i), pred=ok)

        ch = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, WL)))
        xv, sv, zv = _ld_side(x_ptr, s_ptr, z_ptr, ch, NCH, xm, xk, zn, n_ok, stride_xm, stride_xk, stride_sn,
                              stride_sg, stride_zn, stride_zg, GROUP, KS, HAS_ZEROS, EVEN_N, EVEN_K, XL, ZL)
        acc = gl.zeros([W, BN, BM], gl.float32, layout=MMA)
        zero_acc = gl.zeros([W, BN, BM], gl.float32, layout=MMA)
        for i in range(slots):
            slot = i % STAGES
            # every warp is done reading slot i - 1, the one refilled now (a read-then-TMA-write hazard: the
            # barrier orders it, no proxy fence needed)
            gl.thread_barrier()
            nxt = i + STAGES - 1
            ok = nxt < slots
            ns = nxt % STAGES
            mbarrier.expect(bars.index(ns), w_desc.block_type.nbytes, pred=ok)
            tma.async_copy_global_to_shared(w_desc, [r0 + nxt * SLOT, c0], bars.index(ns), w_smem.index(ns), pred=ok)
            for h in gl.static_range(SPS):
                st = i * SPS + h
                x1, s1, z1 = _ld_side(x_ptr, s_ptr, z_ptr, ch + W, NCH, xm, xk, zn, n_ok, stride_xm, stride_xk,
                                      stride_sn, stride_sg, stride_zn, stride_zg, GROUP, KS, HAS_ZEROS, EVEN_N,
                                      EVEN_K, XL, ZL, st + 1 < steps)
                if h == 0:
                    mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
                if st < steps:  # (a slot's second step past the last: skipped, a uniform branch)
                    wv = w_smem.index(slot).reshape([SPS * W, RW, BN]).slice(h * W, W).load(WL)
                    acc = _ld_step(acc, zero_acc, wv, xv, sv, zv, W, BN, KS, BM, BF16, HAS_ZEROS, OPA, OPB, SL,
                                   ABLATE, ROWS)
                xv, sv, zv = x1, s1, z1
                ch = ch + W
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        _ld_store(acc, b_ptr, out_ptr, M, N, n0, pid_m * BM, stride_om, stride_on, BN, BM, HAS_BIAS, MMA)

def ldmma_supported(x: torch.Tensor, qweight: torch.Tensor, group_size: int) -> Optional[str]:
    """None when the ldmma kernel takes this launch, else why not (the caller keeps another kernel)."""
    if not HAVE_GLUON:
        return "triton.experimental.gluon is not available"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"x must be float16 / bfloat16 (the MMA's operands are 16-bit), got {x.dtype}"
    if group_size < 32 or group_size % 32:
        return f"group_size must be a multiple of 32 (a K chunk is 32..128 columns of one group), got {group_size}"
    if qweight.dim() == 3:  # ldmma_tile's format
        if qweight.stride(2) != 1 or qweight.shape[2] not in (16, 32, 64) or qweight.data_ptr() % 16 \
                or qweight.stride(1) % 4 or qweight.stride(0) % 4:
            return "tiled qweight must be [N / BN, K / 8, BN] (BN 16 / 32 / 64) with 16-byte aligned rows"
    elif qweight.stride(0) != 1 or qweight.shape[0] % 4 or qweight.data_ptr() % 16 or qweight.stride(1) % 4:
        return "qweight must be N-contiguous with 16-byte aligned rows of its [K / 8, N] view (16-byte word loads)"
    return None


def int4_ldmma(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], out: torch.Tensor, group_size: int, cfg: dict,
               _ablate: int = 0) -> torch.Tensor:
    """Launch the ldmma kernel (int4_gemm has checked shapes and ldmma_supported) for x [M, K] into out [M, N].
    cfg: BLOCK_M (8 / 16: rows of x per program), BLOCK_N (16 / 32 / 64 columns), BLOCK_K (the K chunk, 32 / 64 /
    128, at most the group), AHEAD (1 / 2 chunks per warp in flight ahead of the one multiplied), num_warps (chunk c
    goes to warp c % num_warps), MAXNREG (optional: a register cap per thread, so that more programs fit an SM),
    SPLIT_K (1 / 2 / 4 / 8 programs per column block, each a contiguous K slice, finished by the last to arrive),
    STAGES / ROWS / SPS (the TMA ring, _int4_ldmma_ring_kernel).
    `_ablate` (benchmarks/ldmma_ablate.py, never int4_gemm): the kernel with parts of its step left out (_ld_step);
    its outputs are wrong."""
    M, K = x.shape
    warps = int(cfg.get("num_warps", 4))
    bm = int(cfg.get("BLOCK_M", 8 if M <= 8 else 16))
    bn = int(cfg.get("BLOCK_N", 32))
    if qweight.dim() == 3:  # the tiled format (ldmma_tile): [N / BN, K / 8, BN], a program's words contiguous
        if qweight.shape[2] != bn:
            raise ValueError(f"int4_gemm: ldmma's tiled weights hold {qweight.shape[2]}-column tiles, the config asks "
                             f"BLOCK_N={bn}")
        N = qweight.shape[0] * bn
        stride_qt, stride_qk, stride_qn = qweight.stride()
    else:
        N = qweight.shape[0]
        stride_qn, stride_qk = qweight.stride()
        stride_qt = bn * stride_qn
    ks = int(cfg.get("BLOCK_K", min(group_size, 128)))
    ahead = int(cfg.get("AHEAD", 1))
    stages = int(cfg.get("STAGES", 0))
    rows = int(cfg.get("ROWS", 0))
    sps = int(cfg.get("SPS", 1))
    split = int(cfg.get("SPLIT_K", 1))
    if (bm not in (8, 16) or bn not in (16, 32, 64) or warps not in (1, 2, 4, 8, 16) or ks not in (32, 64, 128)
            or group_size % ks or ahead not in (1, 2) or stages not in (0, 2, 3, 4, 5, 6, 8)
            or (stages and (bn != 32 or sps * warps * ks // 8 > 256)) or rows not in (0, 1) or sps not in (1, 2)
            or (rows and (not stages or ks < 64)) or (sps > 1 and not stages) or split not in (1, 2, 4, 8)
            or (split > 1 and stages)):
        raise ValueError(f"int4_gemm: impl 'ldmma' takes BLOCK_M 8 / 16, BLOCK_N 16 / 32 / 64, BLOCK_K 32 / 64 / 128 "
                         f"dividing the group ({group_size}), AHEAD 1 / 2, 1..16 warps (a power of two) and STAGES 0 "
                         f"(plain loads) or 2..8 (a TMA ring: BLOCK_N 32, SPS x num_warps x BLOCK_K / 8 <= 256; ROWS 1 "
                         f"and SPS 2 with the ring, ROWS 1 with BLOCK_K >= 64) and SPLIT_K 1 / 2 / 4 / 8 (plain "
                         f"loads), got "
                         f"BLOCK_M={bm} BLOCK_N={bn} BLOCK_K={ks} AHEAD={ahead} STAGES={stages} ROWS={rows} SPS={sps} "
                         f"SPLIT_K={split} num_warps={warps}")
    if x.stride(1) != 1 or x.data_ptr() % 16 or (M > 1 and x.stride(0) % 8):
        x = torch.empty((M, K), dtype=x.dtype, device=x.device).copy_(x)  # fresh: 16-byte x loads
    z = zeros if zeros is not None else scales
    b = bias if bias is not None else scales
    if stages:  # the TMA ring: a step's W chunks (W x KS / 8 word rows of BN columns) one box
        layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
        if qweight.dim() == 3:
            view = qweight.reshape(qweight.shape[0] * qweight.shape[1], bn)
        else:
            view = qweight.t()
        desc = TensorDescriptor.from_tensor(view, [sps * warps * ks // 8, bn], layout)
        _int4_ldmma_ring_kernel[(cdiv(N, bn), cdiv(M, bm))](
            desc, x, scales, z, b, out, M, N, K // ks, K // 8,
            x.stride(0), x.stride(1), scales.stride(0), scales.stride(1), z.stride(0), z.stride(1), out.stride(0),
            out.stride(1), GROUP=group_size, KS=ks, BM=bm, BN=bn, HAS_ZEROS=zeros is not None,
            HAS_BIAS=bias is not None, EVEN_N=N % bn == 0, EVEN_K=(K // ks) % warps == 0, TILED=qweight.dim() == 3,
            STAGES=stages, ROWS=rows, SPS=sps, ABLATE=_ablate, num_warps=warps,
            **({"maxnreg": int(cfg["MAXNREG"])} if cfg.get("MAXNREG") else {}))
        return out
    nch = K // ks
    cps = cdiv(nch, split)  # chunks per K slice
    if split > 1:  # each tile's split fp32 slots (the last program to arrive sums them) and arrival counters
        tiles = cdiv(N, bn) * cdiv(M, bm)
        part = torch.empty(tiles * split * bn * bm, dtype=torch.float32, device=x.device)
        counters = arrival_counters(x.device, tiles)
    else:
        part, counters = out, out  # never touched with SPLIT_K=1
    _int4_ldmma_kernel[(cdiv(N, bn), cdiv(M, bm), split)](
        qweight, x, scales, z, b, out, part, counters, M, N, nch, cps,
        stride_qt, stride_qn, stride_qk, x.stride(0), x.stride(1), scales.stride(0), scales.stride(1),
        z.stride(0), z.stride(1), out.stride(0), out.stride(1),
        GROUP=group_size, KS=ks, BM=bm, BN=bn, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
        EVEN_N=N % bn == 0, EVEN_K=nch % (warps * split) == 0, AHEAD=ahead, SPLIT_K=split, ABLATE=_ablate,
        num_warps=warps, **({"maxnreg": int(cfg["MAXNREG"])} if cfg.get("MAXNREG") else {}))
    return out


def ldmma_tile(qweight: torch.Tensor, block_n: int = 32) -> torch.Tensor:
    """kernopt's N-contiguous words [N, K / 8] (N a multiple of block_n) -> the tiled format [N / block_n, K / 8,
    block_n]: program n's words (columns block_n n .. + block_n - 1, all of K) one contiguous block, word row j of it
    at j * block_n. Word (n, j) of the input is element [n // block_n, j, n % block_n] of the output."""
    N, KW = qweight.shape
    if N % block_n:
        raise ValueError(f"ldmma_tile: N ({N}) must be a multiple of block_n ({block_n})")
    return qweight.t().reshape(KW, N // block_n, block_n).permute(1, 0, 2).contiguous()


def ldmma_untile(tiled: torch.Tensor) -> torch.Tensor:
    """The inverse of ldmma_tile: [N / BN, K / 8, BN] -> N-contiguous [N, K / 8] (a view of a fresh [K / 8, N])."""
    T, KW, bn = tiled.shape
    return tiled.permute(1, 0, 2).reshape(KW, T * bn).t()


# --------------------------------------------------------------------------------------------------
# CPU emulation of the relabelling (the kernel's joins, reshapes and permutations, in torch)
# --------------------------------------------------------------------------------------------------
def row_order(rw: int, rows: int = 0) -> torch.Tensor:
    """The chunk's word rows in the order the kernel's (KB, C) positions take them: natural, or (ROWS 1) word row
    8 jh + 4 j2 + 2 j1 + j0 at position (2 jh + j0, 2 j2 + j1) (_ld_operand_a's _ROW_ORDER)."""
    if not rows:
        return torch.arange(rw)
    return torch.arange(rw).reshape(rw // 8, 2, 2, 2).permute(0, 3, 1, 2).reshape(-1)


def _emulate_a(words: torch.Tensor, ks: int, rows: int = 0) -> torch.Tensor:
    """[RW, BN] words of one chunk (one warp) -> [BN, ks] (q - 8) as the kernel's A operand (rows relabelled, K in
    the dot's order), float64."""
    words = words[row_order(ks // 8, rows)]
    bn = words.shape[1]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nib = ((words.unsqueeze(-1) >> shifts) & 0xF).double() - 8.0   # [RW, BN, i]
    e, h, s = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(2), indexing="ij")
    j = nib[:, :, (2 * s + h + 4 * e).reshape(-1)].reshape(ks // 8, bn, 2, 2, 2)  # [RW, BN, e, h, s]
    j = j.unsqueeze(0).reshape(1, ks // 32, 4, 8, bn // 16, 2, 2, 2, 2).permute(A_PERM)
    return j.reshape(bn, ks)


def _emulate_b(xv: torch.Tensor, ks: int, rows: int = 0) -> torch.Tensor:
    """[BM, ks] x of one chunk in natural order -> [ks, BM] in the dot's order."""
    bm = xv.shape[0]
    xv = xv.reshape(bm, ks // 8, 8)[:, row_order(ks // 8, rows)].reshape(bm, ks)
    return xv.unsqueeze(0).reshape(1, bm, ks // 32, 4, 2, 2, 2).permute(X_PERM).reshape(ks, bm)


def _emulate_rows(v: torch.Tensor) -> torch.Tensor:
    """[BN] per physical column -> per MMA row (the kernel's _ld_rows)."""
    bn = v.shape[0]
    return v.reshape(1, 8, bn // 16, 2).permute(S_PERM).reshape(bn)


def ldmma_emulate(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                  block_n: int = 32, ks: Optional[int] = None, rows: int = 0) -> torch.Tensor:
    """y = x @ dequant(qweight, scales, symmetric).T computed as the kernel relabels it: per program of block_n
    columns and K chunk, the relabelled A [block_n, ks] @ B [ks, M] times the chunk's scales relabelled per MMA row,
    then rows mapped back to columns (column_of_row); rows: the word rows' order (ROWS, row_order). float64; N a
    multiple of block_n and K of the chunk."""
    M, K = x.shape
    N = qweight.shape[0]
    ks = ks or min(group_size, 128)
    qt = qweight.t()  # [K / 8, N]
    out = torch.zeros(M, N, dtype=torch.float64)
    cols = column_of_row(torch.arange(block_n), block_n)
    for n0 in range(0, N, block_n):
        acc = torch.zeros(block_n, M, dtype=torch.float64)
        for c in range(K // ks):
            a = _emulate_a(qt[c * ks // 8:(c + 1) * ks // 8, n0:n0 + block_n], ks, rows)
            b = _emulate_b(x[:, c * ks:(c + 1) * ks].double(), ks, rows)
            acc += (a @ b) * _emulate_rows(scales[n0:n0 + block_n, (c * ks) // group_size].double())[:, None]
        out[:, n0 + cols] = acc.t()
    return out
