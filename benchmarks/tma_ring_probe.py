"""How fast a persistent TMA ring streams kernopt's int4 words on this GPU, with the wgr kernel's box shapes.

    python benchmarks/tma_ring_probe.py [--out DIR]   (GPU; writes DIR/tma_ring_probe-<gpu>.json)

Why: benchmarks/wgr_ablate.py timed the table's wgr kernel without its unpack and wgmma at about the time of the
whole kernel (sweeps/wgr_ablate: 14.5 against 16.1 us at M=4 K4096 N14336), far from the words' plain-load read
roofline (3.46 TB/s, sweeps/int4_read_roofline). This kernel keeps only the ring: one program per resident slot
(CTAS per SM), each a contiguous run of the (column tile, K step) sequence as wgr's stream-K walks it; per step it
waits for its slot, reads one word row of it (so the slot is consumed), passes a CTA barrier and issues the TMA
copy STAGES - 1 steps ahead: words [ROWS, BLOCK_N] of the N-contiguous [K / 8, N] view, and with EXTRA also the
copies wgr adds (an x tile [8, 8 ROWS] bf16 and one scale and one zero row [1, BLOCK_N]). Time is CUDA-graph replay
with inputs rotated past the L2 (the gemm_int4 suite's rule); TB/s counts the words plus, with EXTRA, the scale and
zero rows. Each variant's output is checked: the sum of the word rows it read equals torch's.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kernopt.benchmark import Suite, require_cuda, rotation, time_graph_ms
from kernopt.kernels.host import cdiv, sm_count
from kernopt.kernels.int4_wgmma import (TensorDescriptor, _sk_coords, _sk_next, fence_async_shared, gl, gluon,
                                        mbarrier, tma)


@gluon.jit
def _issue(w_desc, x_desc, s_desc, z_desc, bar, w_buf, x_buf, s_buf, z_buf, ks, tn, ok, ROWS: gl.constexpr,
           BLOCK_N: gl.constexpr, EXTRA: gl.constexpr):
    if EXTRA:
        mbarrier.expect(bar, w_desc.block_type.nbytes + x_desc.block_type.nbytes + s_desc.block_type.nbytes
                        + z_desc.block_type.nbytes, pred=ok)
    else:
        mbarrier.expect(bar, w_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(w_desc, [ks * ROWS, tn * BLOCK_N], bar, w_buf, pred=ok)
    if EXTRA:
        tma.async_copy_global_to_shared(x_desc, [0, ks * ROWS * 8], bar, x_buf, pred=ok)
        tma.async_copy_global_to_shared(s_desc, [(ks * ROWS * 8) // 128, tn * BLOCK_N], bar, s_buf, pred=ok)
        tma.async_copy_global_to_shared(z_desc, [(ks * ROWS * 8) // 128, tn * BLOCK_N], bar, z_buf, pred=ok)


@gluon.jit
def _tma_ring_kernel(w_desc, x_desc, s_desc, z_desc, out_ptr, W, spt, tiles_n, ROWS: gl.constexpr,
                     BLOCK_N: gl.constexpr,
                     XK: gl.constexpr, STAGES: gl.constexpr, EXTRA: gl.constexpr):
    pid = gl.program_id(0)
    P = gl.num_programs(0)
    s_lo = (pid * W) // P
    s_hi = ((pid + 1) * W) // P
    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, ROWS, BLOCK_N], w_desc.layout)
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES if EXTRA else 1, 8, XK], x_desc.layout)
    s_smem = gl.allocate_shared_memory(s_desc.dtype, [STAGES if EXTRA else 1, 1, BLOCK_N], s_desc.layout)
    z_smem = gl.allocate_shared_memory(z_desc.dtype, [STAGES if EXTRA else 1, 1, BLOCK_N], z_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    iks, itn, itm = _sk_coords(s_lo, spt, tiles_n)  # wgr's stream-K walk (one row tile: itm stays 0)
    for i in gl.static_range(STAGES - 1):
        e = i if EXTRA else 0
        _issue(w_desc, x_desc, s_desc, z_desc, bars.index(i), w_smem.index(i), x_smem.index(e), s_smem.index(e),
               z_smem.index(e), iks, itn, s_lo + i < s_hi, ROWS, BLOCK_N, EXTRA)
        iks, itn, itm = _sk_next(iks, itn, itm, spt, tiles_n)
    L: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [gl.num_warps(), 1], [1, 0])
    acc = gl.zeros([1, BLOCK_N], gl.int32, layout=L)
    for i in range(s_hi - s_lo):
        slot = i % STAGES
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        acc += w_smem.index(slot).slice(0, 1).load(L)
        gl.thread_barrier()  # every warp done with the slot the next copy overwrites
        ns = (i + STAGES - 1) % STAGES
        e = ns if EXTRA else 0
        _issue(w_desc, x_desc, s_desc, z_desc, bars.index(ns), w_smem.index(ns), x_smem.index(e), s_smem.index(e),
               z_smem.index(e), iks, itn, s_lo + i + STAGES - 1 < s_hi, ROWS, BLOCK_N, EXTRA)
        iks, itn, itm = _sk_next(iks, itn, itm, spt, tiles_n)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, L))
    gl.store(out_ptr + pid * BLOCK_N + cols[None, :], acc)


def _desc(t: torch.Tensor, box: list[int]):
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=t.element_size() * 8, rank=2)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), box, layout)


VARIANTS = [  # (ROWS, BLOCK_N, STAGES, CTAS per SM, EXTRA)
    (16, 128, 3, 4, 1),   # the wgr table's ring at 8 rows (words, x, scales, zeros per step)
    (16, 128, 3, 4, 0),   # its words alone
    (16, 128, 6, 4, 0),
    (16, 128, 3, 8, 0),
    (32, 128, 3, 4, 0),
    (16, 256, 3, 4, 0),
    (32, 256, 3, 2, 0),
    (64, 128, 3, 2, 0),
    (16, 128, 6, 4, 1),
    (32, 128, 3, 3, 1),
]
# --strips: CTAS 0 = one program per column tile over all of K (the tgemv kernel's walk, kernels/int4_tgemv.py): how
# fast whole-K column strips of 32 / 64 / 128 words stream, against the stream-K walk's (16, 128, 3, 4)
STRIPS = [(16, 128, 3, 4, 0), (64, 32, 4, 0, 0), (128, 32, 3, 0, 0), (256, 32, 2, 0, 0), (64, 64, 4, 0, 0),
          (32, 128, 4, 0, 0), (16, 128, 6, 0, 0), (64, 128, 3, 0, 0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/sweeps/tma_ring")
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--strips", action="store_true", help="the STRIPS variants instead of VARIANTS")
    args = ap.parse_args()
    require_cuda("tma_ring_probe.py")
    sms, g, rows = sm_count(torch.device("cuda")), 128, []
    for K, N in ((4096, 14336), (14336, 4096)):
        nbytes = K * N // 2 + 2 * 2 * N * (K // g)
        copies, calls = rotation(nbytes)
        sets = []
        for _ in range(copies):
            words = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device="cuda")
            s = torch.rand(K // g, N, device="cuda").to(torch.bfloat16)
            z = torch.rand(K // g, N, device="cuda").to(torch.bfloat16)
            x = torch.randn(8, K, device="cuda", dtype=torch.bfloat16)
            sets.append((words, s, z, x))
        for rows_, bn, stages, ctas, extra in (STRIPS if args.strips else VARIANTS):
            spt = cdiv(K // 8, rows_)
            W = cdiv(N, bn) * spt
            P = min(W, ctas * sms) if ctas else cdiv(N, bn)  # ctas 0: a program per column tile, all of K
            xk = min(256, rows_ * 8)  # TMA boxes are <= 256 a side (EXTRA variants: 16 / 32 rows, x boxes of 8 ROWS)
            descs = [(_desc(w, [rows_, bn]), _desc(x, [8, xk]), _desc(s, [1, bn]), _desc(z, [1, bn]))
                     for w, s, z, x in sets]
            out = torch.empty(P * bn, dtype=torch.int32, device="cuda")

            def make(i, rows_=rows_, bn=bn, stages=stages, extra=extra, W=W, spt=spt, P=P, xk=xk, descs=descs,
                     out=out):
                wd, xd, sd, zd = descs[i]
                return lambda: _tma_ring_kernel[(P,)](wd, xd, sd, zd, out, W, spt, cdiv(N, bn), ROWS=rows_,
                                                      BLOCK_N=bn, XK=xk, STAGES=stages, EXTRA=extra, num_warps=4)
            make(0)()
            want = sets[0][0][::rows_].to(torch.int64).sum()
            got = out.to(torch.int64).sum()
            ok = bool(((want - got) % 2**32) == 0)
            us = 1e3 * time_graph_ms(make, copies, calls, args.rep)
            moved = K * N // 2 + (2 * 2 * N * (K // g) if extra else 0)
            row = {"K": K, "N": N, "ROWS": rows_, "BLOCK_N": bn, "STAGES": stages, "CTAS_PER_SM": ctas,
                   "EXTRA": extra, "us": round(us, 3), "tbps": round(moved / us / 1e6, 3), "check": "ok" if ok else
                   "word-row sum differs"}
            print(f"K={K} N={N} rows {rows_} x {bn} stages {stages} x {ctas}/SM extra {extra}: {us:.2f} us "
                  f"{row['tbps']:.2f} TB/s ({row['check']})")
            rows.append(row)
    suite = Suite("tma_ring_probe")  # the suites' JSON header (device, versions, commit, date)
    suite.header["sms"] = sms
    suite.rows = rows
    print("wrote", suite.write(Path(args.out)))


if __name__ == "__main__":
    main()
