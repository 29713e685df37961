"""INT4 weight-only GEMV for one row of x on Hopper, written in Gluon: ``tgemv`` (TMA-fed, whole-K column strips).

y[1, N] = x[1, K] @ dequant(qweight, scales, zeros)[N, K].T (+ bias), kernopt's int4 format (kernels/int4_gemm.py:
N-contiguous int32 words, nibble i of word j is k = 8 j + i), bf16 x.

Why it was built: at one row the product is a read of the words (K N / 2 bytes) and little else, and the Triton GEMV
(gemv2 PAIRS, the table's M = 1 pick) reads them at about half the H200's rate: 15.7 us at K4096 N14336 where a TMA
ring alone moves the same words in 8.7-9.6 us (sweeps/tma_ring). ncu put PAIRS at 38 % of DRAM bandwidth with 1.07
eligible warps per scheduler: its bytes in flight are bounded by the registers of the programs resident, and its
split-K partials need a second pass (the single-pass arrival and sum). This kernel has neither limit:

- **One program per column strip, all of K.** Program p owns columns [p BLOCK_N, (p + 1) BLOCK_N) and walks the
  whole of K, so it writes finished outputs: no split-K, no workspace, no arrival counters, no reduction across
  programs. With BLOCK_N = 32 a strip's word rows are 128-byte lines; N / 32 programs (448 at N = 14336, 128 at
  N = 4096).
- **Words, scales and zeros by TMA into a STAGES-deep ring** (an mbarrier per slot), ``ROWS`` word rows (8 ROWS of
  K, whole groups) per step: bytes in flight cost shared memory, not registers. A step's boxes are the words
  [GR, RPG, BLOCK_N] (GR groups of RPG = group / 8 word rows: the 3-D view of the [K / 8, N] words) and the
  scales / zeros [GR, BLOCK_N], so that in registers a word's scale is its group row broadcast along RPG (no
  gather). TMA zero-fills past K and N: such words and scales contribute 0.
- **x once per program, in shared memory** as its bf16 pairs per word row ([4 step + pair, GR, RPG] int32), with the
  fp32 sum of each word row's 8 x (zero points) beside it.
- **The math is PAIRS'** (`word_pairs_ptx`, shared with kernels/int4_gemm.py): per word the fp32 sum of
  x_k (q_k - 8) over its 8 nibbles with packed bf16x2 instructions, then ``acc += (sum + (8 - z) xsum) s``
  (``acc += sum s`` without zero points) into a [GR, RPG, BLOCK_N] fp32 accumulator, summed over its two word-row
  axes at the end.

Measured on the H200 (bf16 x, group 128; int4_gemm's --tune, CUDA-graph replay): **slower than PAIRS everywhere**,
so not the table's pick (a --tune candidate). sweeps/tgemv3 (5bec603, this kernel): best 20.05 / 18.16 / 8.45 us at
K4096 N14336 / K14336 N4096 / 4096^2 with zero points (17.95 / 16.92 / 7.94 symmetric) against PAIRS' 15.67 / 15.91 /
7.72 (13.89 / 13.77 / 7.19) in the same runs; sweeps/tgemv1 (a3e1b86, before the slot fix) gave the same. The walk is
not what limits it: the ring alone over the same whole-K 32-word strips streams the words in 8.9-9.1 us at K4096
N14336 (sweeps/tma_ring_strips, as fast as the stream-K walk; 10.3 us at K14336 N4096, one program per SM). The
kernel is: ncu (profiles/ncu-tgemv-1e09a65.txt, a variant that TMA'd x and split its pairs in registers, 23-25 us,
sweeps/tgemv2) counts 42 instructions a word (PAIRS' compiled loop 26), 0.46 issued per cycle per scheduler with 0.96
eligible warps, and 36 % of the stall cycles on the long scoreboard. Groups of 256 first faulted (misaligned
address): a scale slot of 64 bytes broke TMA's 128-byte shared-memory alignment; slots are now rounded up to 128
bytes (GRP rows).

No interpreter: Gluon kernels do not run under TRITON_INTERPRET. tests/kernels/sm90_offline.py compiles it for sm_90a
on CPU (registers, shared memory, spills); the GPU tests (marked gpu) check it against the dequantized reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .host import cdiv
from .int4_wgmma import HAVE_GLUON, tma_rows_ok

if HAVE_GLUON:
    from .int4_wgmma import TensorDescriptor, _row_desc, fence_async_shared, gl, gluon, mbarrier, tma


def word_pairs_ptx() -> str:
    """PAIRS' PTX for one word $1 and x's four bf16 pairs $2..$5 (pair m = x[k + 2m], x[k + 2m + 1]): the fp32 sum
    $0 = sum_i x_i (q_i - 8) over the word's 8 nibbles, with packed bf16x2 math (two nibbles per instruction).

    prmt puts byte m of the word (nibbles 2m, 2m + 1) in the low half and byte m of (word >> 4) in the high half, so
    lop3 (& 0x000F000F | 0x43004300) reads bf16 (128 + q_2m, 128 + q_2m+1): the nibble pair in x's own pair order.
    One packed FMA (x 1 - 136) centres it to q - 8, exactly (so the products carry no 128 bias into the bf16 sums),
    four packed FMAs sum the 8 products into two bf16 lanes (4 terms each), and the lanes go to fp32 (shift / mask)
    and are added. Per word: SHF + 4 PRMT + 4 LOP3 + 4 + 4 HFMA2 + 3 = 20 instructions here; the compiled loop,
    with its loads, addresses and the scale FFMA, has 26 per word (413 per 16 words, sass_loop --symmetric) against
    43 for gemv2's fp32 path with bf16 x."""
    lop = "".join(f"\n    prmt.b32 t{m}, $1, s4, {(m | m << 4 | (4 + m) << 8 | (4 + m) << 12):#06x};"
                  f"\n    lop3.b32 t{m}, t{m}, 0x000F000F, 0x43004300, 0xEA;"
                  f"\n    fma.rn.bf16x2 t{m}, t{m}, one, c8;" for m in range(4))
    return f"""
    {{
    .reg .b32 s4, t0, t1, t2, t3, one, c8, nz, acc, lo, hi;
    mov.b32 one, 0x3F803F80;
    mov.b32 c8, 0xC308C308;
    mov.b32 nz, 0x80008000;
    shr.u32 s4, $1, 4;{lop}
    fma.rn.bf16x2 acc, t0, $2, nz;
    fma.rn.bf16x2 acc, t1, $3, acc;
    fma.rn.bf16x2 acc, t2, $4, acc;
    fma.rn.bf16x2 acc, t3, $5, acc;
    shl.b32 lo, acc, 16;
    and.b32 hi, acc, 0xFFFF0000;
    add.f32 $0, lo, hi;
    }}
    """


def _strip_warps(group_rows, rows_per_group, block_n, num_warps):
    """The accumulator layout's warps over (groups, word rows of a group), or None when the [GR, RPG, BLOCK_N] tile is
    smaller than one pass of the layout (which would repeat elements): lanes take 4 words each along BLOCK_N and the
    rest of the warp along the word rows."""
    lanes_n = block_n // 4
    if block_n % 4 or not 1 <= lanes_n <= 32 or 32 % lanes_n:
        return None
    lanes_r = 32 // lanes_n
    if rows_per_group % lanes_r:
        return None
    w1 = max(1, min(num_warps, rows_per_group // lanes_r))
    w0 = num_warps // w1
    if w0 * w1 != num_warps or w0 > group_rows or group_rows % w0:
        return None
    return w0, w1


strip_warps = gluon.constexpr_function(_strip_warps) if HAVE_GLUON else _strip_warps


if HAVE_GLUON:
    _PAIRS_PTX = gl.constexpr(word_pairs_ptx())

    @gluon.constexpr_function
    def _strip_layout(GR, RPG, BLOCK_N, NUM_WARPS):
        """[GR, RPG, BLOCK_N] words: 4 consecutive columns per lane (one 16-byte shared-memory read), BLOCK_N / 4 lanes
        along a word row, the rest of the warp and the warps along the word rows (strip_warps)."""
        w0, w1 = strip_warps(GR, RPG, BLOCK_N, NUM_WARPS)
        lanes_n = BLOCK_N // 4
        return gl.BlockedLayout([1, 1, 4], [1, 32 // lanes_n, lanes_n], [w0, w1, 1], [2, 1, 0])

    @gluon.jit
    def _tgemv_issue(w_desc, s_desc, z_desc, bar, w_smem, s_smem, z_smem, slot, step, col0, ok,
                     GR: gl.constexpr, HAS_ZEROS: gl.constexpr):
        """TMA copies of step `step`'s words, scales (and zeros) into ring slot `slot` (nothing when not ok)."""
        if HAS_ZEROS:
            mbarrier.expect(bar, w_desc.block_type.nbytes + s_desc.block_type.nbytes + z_desc.block_type.nbytes,
                            pred=ok)
        else:
            mbarrier.expect(bar, w_desc.block_type.nbytes + s_desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(w_desc, [step * GR, 0, col0], bar, w_smem.index(slot), pred=ok)
        tma.async_copy_global_to_shared(s_desc, [step * GR, col0], bar, s_smem.index(slot).slice(0, GR), pred=ok)
        if HAS_ZEROS:
            tma.async_copy_global_to_shared(z_desc, [step * GR, col0], bar, z_smem.index(slot).slice(0, GR), pred=ok)

    @gluon.jit
    def _int4_tgemv_kernel(w_desc, s_desc, z_desc, xp_ptr, b_ptr, out_ptr, N, KW, stride_b, stride_on,
                           GROUP: gl.constexpr, GR: gl.constexpr, GRP: gl.constexpr, NSTEPS: gl.constexpr,
                           BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_ZEROS: gl.constexpr,
                           HAS_BIAS: gl.constexpr):
        RPG: gl.constexpr = GROUP // 8
        L3: gl.constexpr = _strip_layout(GR, RPG, BLOCK_N, gl.num_warps())
        SL: gl.constexpr = gl.SliceLayout(1, L3)  # [GR, BLOCK_N]: a step's scales / zeros
        XL: gl.constexpr = gl.SliceLayout(2, L3)  # [GR, RPG]: per word row (x pairs, x sums)
        col0 = gl.program_id(0) * BLOCK_N

        w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, GR, RPG, BLOCK_N], w_desc.layout)
        # scale / zero slots of GRP >= GR rows: each slot a multiple of 128 bytes (TMA's shared-memory alignment)
        s_smem = gl.allocate_shared_memory(s_desc.dtype, [STAGES, GRP, BLOCK_N], s_desc.layout)
        z_smem = gl.allocate_shared_memory(z_desc.dtype, [STAGES if HAS_ZEROS else 1, GRP, BLOCK_N], z_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()
        for i in gl.static_range(STAGES):
            _tgemv_issue(w_desc, s_desc, z_desc, bars.index(i), w_smem, s_smem, z_smem, i, i, col0, i < NSTEPS,
                         GR, HAS_ZEROS)

        # x (bf16 pairs as int32, [1, K / 2]) into shared memory while the first copies fly: [4 step + m, GR, RPG] is
        # pair m of the step's word rows (pair m of word row R = x[8 R + 2 m], x[8 R + 2 m + 1]), zero past K; with
        # zero points also the fp32 sum of each word row's 8 x.
        XS: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])  # the layout of one index (a rank below)
        x_smem = gl.allocate_shared_memory(gl.int32, [4 * NSTEPS, GR, RPG], XS)
        xs_smem = gl.allocate_shared_memory(gl.float32, [NSTEPS if HAS_ZEROS else 1, GR, RPG], XS)
        PL: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 32, 1], [gl.num_warps(), 1, 1], [2, 1, 0])
        pg = gl.arange(0, GR, layout=gl.SliceLayout(1, gl.SliceLayout(2, PL)))
        pr = gl.arange(0, RPG, layout=gl.SliceLayout(0, gl.SliceLayout(2, PL)))
        pm = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, PL)))
        for c in range(NSTEPS):
            row = gl.expand_dims(gl.expand_dims((c * GR + pg) * RPG, 1) + gl.expand_dims(pr, 0), 2)  # [GR, RPG, 1]
            xp = gl.load(xp_ptr + row * 4 + gl.expand_dims(gl.expand_dims(pm, 0), 1), mask=row < KW, other=0)
            even, odd = gl.split(gl.reshape(xp, [GR, RPG, 2, 2]))  # m = 2 a + b, split on b: pairs (0, 2), (1, 3)
            x0, x2 = gl.split(even)
            x1, x3 = gl.split(odd)
            x_smem.index(4 * c).store(x0)
            x_smem.index(4 * c + 1).store(x1)
            x_smem.index(4 * c + 2).store(x2)
            x_smem.index(4 * c + 3).store(x3)
            if HAS_ZEROS:
                lo = (xp << 16).to(gl.float32, bitcast=True)
                hi = (xp & -65536).to(gl.float32, bitcast=True)
                xs_smem.index(c).store(gl.sum(lo + hi, 2))
        gl.thread_barrier()  # every warp's x stores land before any warp reads them

        acc = gl.zeros([GR, RPG, BLOCK_N], gl.float32, L3)
        for i in range(NSTEPS):
            slot = i % STAGES
            mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
            w = w_smem.index(slot).load(L3)
            s = s_smem.index(slot).slice(0, GR).load(SL).to(gl.float32)
            if HAS_ZEROS:
                z = z_smem.index(slot).slice(0, GR).load(SL).to(gl.float32)
                xs = xs_smem.index(i).load(XL)
            p0 = gl.expand_dims(x_smem.index(4 * i).load(XL), 2)
            p1 = gl.expand_dims(x_smem.index(4 * i + 1).load(XL), 2)
            p2 = gl.expand_dims(x_smem.index(4 * i + 2).load(XL), 2)
            p3 = gl.expand_dims(x_smem.index(4 * i + 3).load(XL), 2)
            gl.thread_barrier()  # every warp has read the slot: refill it STAGES steps ahead
            _tgemv_issue(w_desc, s_desc, z_desc, bars.index(slot), w_smem, s_smem, z_smem, slot, i + STAGES, col0,
                         i + STAGES < NSTEPS, GR, HAS_ZEROS)
            ws = gl.inline_asm_elementwise(_PAIRS_PTX, "=r,r,r,r,r,r", [w, p0, p1, p2, p3], dtype=gl.float32,
                                           is_pure=True, pack=1)
            if HAS_ZEROS:
                acc += (ws + gl.expand_dims(xs, 2) * gl.expand_dims(8.0 - z, 1)) * gl.expand_dims(s, 1)
            else:
                acc += ws * gl.expand_dims(s, 1)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        res = gl.sum(gl.sum(acc, 1), 0)  # [BLOCK_N]
        cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, SL))
        ok = cols < N
        if HAS_BIAS:
            res += gl.load(b_ptr + cols * stride_b, mask=ok, other=0.0).to(gl.float32)
        gl.store(out_ptr + cols * stride_on, res.to(out_ptr.dtype.element_ty), mask=ok)


_TMA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def tgemv_supported(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                    group_size: int) -> Optional[str]:
    """None when the tgemv kernel takes this launch, else why not (the caller keeps another kernel)."""
    if not HAVE_GLUON:
        return "triton.experimental.gluon is not available"
    if x.dtype != torch.bfloat16:
        return f"x must be bfloat16 (PAIRS' packed bf16x2 sums), got {x.dtype}"
    if x.shape[0] != 1:
        return f"one row of x only, got {x.shape[0]}"
    if not 32 <= group_size <= 2048:
        return f"group_size must be 32..2048 (a group is whole word rows of a TMA box), got {group_size}"
    if not tma_rows_ok(qweight) or qweight.shape[0] % 4:
        return "qweight must be N-contiguous with 16-byte aligned rows of its [K / 8, N] view (the TMA box)"
    for t, name in ((scales, "scales"), (zeros, "zeros")):
        if t is not None and (t.dtype not in _TMA_DTYPES or not tma_rows_ok(t)):
            return (f"{name} must be bf16 / fp16 / fp32, N-contiguous with 16-byte aligned rows (TMA boxes), got "
                    f"{t.dtype} strides {tuple(t.stride())}")
    return None


def tgemv_geometry(K: int, group_size: int, cfg: dict) -> tuple[int, int]:
    """(GR, NSTEPS): groups per step (ROWS word rows, at least one group) and steps over K."""
    rows = max(int(cfg.get("ROWS", 64)), group_size // 8)
    gr = max(1, rows * 8 // group_size)
    return gr, cdiv(K // group_size, gr)


def int4_tgemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], out: torch.Tensor, group_size: int, cfg: dict) -> torch.Tensor:
    """Launch the tgemv kernel (int4_gemm has checked shapes and tgemv_supported) for x [1, K] into out [1, N]."""
    N, K = qweight.shape[0], x.shape[1]
    bn, warps, stages = int(cfg["BLOCK_N"]), int(cfg.get("num_warps", 8)), int(cfg.get("num_stages", 4))
    rpg = group_size // 8
    gr, nsteps = tgemv_geometry(K, group_size, cfg)
    if strip_warps(gr, rpg, bn, warps) is None:
        raise ValueError(f"int4_gemm: impl 'tgemv': a [{gr}, {rpg}, {bn}] step tile (ROWS={cfg.get('ROWS', 64)}, "
                         f"group {group_size}, BLOCK_N={bn}) is smaller than its layout over {warps} warps")
    if x.stride(1) != 1 or x.data_ptr() % 16:
        x = torch.empty((1, K), dtype=x.dtype, device=x.device).copy_(x)  # fresh: contiguous, aligned
    qt = qweight.t()  # [K / 8, N], N-contiguous
    w_desc = TensorDescriptor(qweight, [K // group_size, rpg, N], [rpg * qt.stride(0), qt.stride(0), 1],
                              [gr, rpg, bn], gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3))
    s_desc = _row_desc(scales, bn, gr)  # (tgemv_supported has checked that TMA reads them as they are: no copy)
    z_desc = _row_desc(zeros, bn, gr) if zeros is not None else s_desc
    # rows of a scale / zero slot: GR, or more so that each slot is a multiple of 128 bytes (both powers of two)
    grp = max([gr] + [128 // math.gcd(128, bn * t.element_size()) for t in (scales, zeros) if t is not None])
    b = bias if bias is not None else out
    _int4_tgemv_kernel[(cdiv(N, bn),)](
        w_desc, s_desc, z_desc, x.view(torch.int32), b, out, N, K // 8, b.stride(-1), out.stride(1),
        GROUP=group_size, GR=gr, GRP=grp, NSTEPS=nsteps, BLOCK_N=bn, STAGES=stages, HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None, num_warps=warps)
    return out
