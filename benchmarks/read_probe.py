"""How fast can a kernel read an int4 weight's words on this GPU, and which program structure gets there?

    python benchmarks/read_probe.py [--out DIR]   (GPU; writes DIR/read_probe-<gpu>.json)

The words of an [N, K] int4 weight (K / 8 x N int32, 29.4 MB at K4096 N14336) in ldmma_tile's format (program p's
words one contiguous block of K / 8 x 32) are read and summed per column by plain Triton kernels of several
structures, timed as the gemm_int4 suite times kernels (CUDA-graph replay, inputs rotated past the L2):
  strip  a program per 32 columns over all of K (ldmma's grid, N / 32 programs), rows R at a time, W warps;
         SPLIT > 1 splits K over that many programs per column block (atomic adds of the sums)
  tma    the same grid with the rows read through a TMA descriptor in a loop Triton pipelines (num_stages)
  flat   one contiguous range per program over the whole buffer (BLOCK words a step, STEPS steps), any grid
No unpack, no x, no MMA: the numbers bound what a kernel with this structure can reach (the 3x bf16 cuBLAS bar at
K4096 N14336 is ~10.3 us on the H200). METHOD.md: measure the floor before building toward it.
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from kernopt.benchmark import Suite, require_cuda, rotation, time_graph_ms

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096)]


@triton.jit
def _strip(q_ptr, out_ptr, KW, R: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr):
    pid, sid = tl.program_id(0), tl.program_id(1)
    rows = KW // SPLIT
    base = q_ptr + pid.to(tl.int64) * KW * 32 + sid * rows * 32
    offs = tl.arange(0, R)[:, None] * 32 + tl.arange(0, 32)[None, :]
    acc = tl.zeros([R, 32], tl.int32)
    for r in tl.range(0, rows, R, num_stages=STAGES):
        acc += tl.load(base + r * 32 + offs)
    tl.atomic_add(out_ptr + pid * 32 + tl.arange(0, 32), tl.sum(acc, axis=0), sem="relaxed")


@triton.jit
def _tma(q_ptr, out_ptr, KW, NT, R: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr):
    pid, sid = tl.program_id(0), tl.program_id(1)
    desc = tl.make_tensor_descriptor(q_ptr, shape=[NT * KW, 32], strides=[32, 1], block_shape=[R, 32])
    rows = KW // SPLIT
    row0 = pid * KW + sid * rows
    acc = tl.zeros([R, 32], tl.int32)
    for r in tl.range(0, rows, R, num_stages=STAGES):
        acc += desc.load([row0 + r, 0])
    tl.atomic_add(out_ptr + pid * 32 + tl.arange(0, 32), tl.sum(acc, axis=0), sem="relaxed")


@triton.jit
def _flat(q_ptr, out_ptr, BLOCK: tl.constexpr, STEPS: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    base = q_ptr + pid.to(tl.int64) * BLOCK * STEPS
    acc = tl.zeros([BLOCK], tl.int32)
    for s in tl.range(0, STEPS, num_stages=STAGES):
        acc += tl.load(base + s * BLOCK + tl.arange(0, BLOCK))
    tl.atomic_add(out_ptr + (pid % 1024), tl.sum(acc, axis=0), sem="relaxed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/sweeps/read_probe")
    ap.add_argument("--rep", type=int, default=50)
    args = ap.parse_args()
    require_cuda("read_probe.py")
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    suite = Suite("read_probe")
    for K, N in SHAPES:
        KW, NT = K // 8, N // 32
        nbytes = KW * N * 4
        copies, calls = rotation(nbytes)
        qs = [torch.randint(-2**31, 2**31 - 1, (NT, KW, 32), dtype=torch.int32, device="cuda") for _ in range(copies)]
        out = torch.zeros(max(N, 1024), dtype=torch.int32, device="cuda")
        results = {}

        def timed(name, launch):
            try:
                results[name] = 1e3 * time_graph_ms(lambda i: (lambda: launch(qs[i])), copies, calls, args.rep)
            except Exception as e:  # a structure this Triton cannot build: say so, keep going
                print(f"{name}: {type(e).__name__}: {str(e)[:200]}")

        for split in (1, 2, 4):
            for R in (16, 64):
                for w in (4, 8):
                    for st in (1, 3):
                        timed(f"strip_s{split}_r{R}_w{w}_st{st}",
                              lambda q, R=R, w=w, st=st, split=split: _strip[(NT, split)](
                                  q, out, KW, R=R, SPLIT=split, STAGES=st, num_warps=w))
            for R in (32, 64):
                for st in (3, 6):
                    timed(f"tma_s{split}_r{R}_w4_st{st}",
                          lambda q, R=R, st=st, split=split: _tma[(NT, split)](
                              q, out, KW, NT, R=R, SPLIT=split, STAGES=st, num_warps=4))
        for block, steps in ((2048, 8), (2048, 32), (4096, 16), (8192, 8)):
            if (KW * N) % (block * steps) == 0:
                timed(f"flat_b{block}_x{steps}",
                      lambda q, block=block, steps=steps: _flat[((KW * N) // (block * steps),)](
                          q, out, BLOCK=block, STEPS=steps, STAGES=1, num_warps=4))
        best = min(results, key=results.get)
        case = f"K={K} N={N} words {nbytes / 1e6:.1f} MB"
        suite.add(case, "µs", False, results, best=best, best_tb_s=round(nbytes / results[best] / 1e6, 3))
        print(case + f": best {best} {results[best]:.2f} us ({nbytes / results[best] / 1e6:.2f} TB/s); " +
              " ".join(f"{k}={v:.2f}" for k, v in sorted(results.items(), key=lambda kv: kv[1])[:12]))
    print(f"wrote {suite.write(args.out)}")


if __name__ == "__main__":
    main()
