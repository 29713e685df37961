"""Benchmark suite "gemm_int4": kernopt's INT4 weight-only GEMM vs bf16 cuBLAS and dequantize + cuBLAS.

Cases (../shared/BENCHMARKS.md): group 128, M in {1, 4, 16, 64, 256} x (K, N) in {(4096, 14336),
(14336, 4096), (4096, 4096)}; metric µs, lower is better. Systems in the same run, same inputs:

- ``kernopt``: `int4_gemm` with the config `select_config` picks (checked against the reference first);
- ``bf16_cublas``: `F.linear` on the already-dequantized bf16 weight (what an unquantized model pays);
- ``dequant_cublas``: dequantize with the Triton kernel, then `F.linear` (the fallback past the crossover).

Weights are random int4 words (never zeros) with asymmetric zero points. Every system is timed the suites'
one way (`kernopt.benchmark.time_graph_ms`, ``"timing": "cuda_graph_replay_rotated"``): one CUDA graph holds
many calls back to back, cycling through enough copies of the operands (weights, scales, zeros, x) that they
can't stay in L2, and the replay time is divided by the calls — how a decode step's GEMMs run under
torch.compile with CUDA graphs. Neither the Python launch (tens of µs for a Triton launch) nor the graph's own
launch latency hides a few-µs kernel's GPU time. `kernopt_eager_launch_us` records one call launched from
Python (do_bench), for comparison. (The 2026-11-25 H100 results timed a one-call graph per replay, which
included the graph's launch latency in every call.)

    python examples/bench_gemm_int4.py [--quick] [--out DIR] [--tune] [--plot]

``--tune`` also times every `candidate_configs` entry per case (the experimental ``gemv2`` / ``tiled2``
variants included at M <= 16) and records the best overall and the best per implementation (for the table).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kernopt.benchmark import Suite, require_cuda, rotation, time_graph_ms, time_ms
from kernopt.kernels.host import cdiv
from kernopt.kernels.int4_gemm import int4_gemm
from kernopt.tolerance import mismatch, rms

try:  # the read roofline below is a Triton kernel; the suite itself needs only kernopt's launchers
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:
    @triton.jit
    def _read_words_kernel(qw_ptr, out_ptr, N, K_WORDS, W_PER_SPLIT, stride_n, stride_w,
                           BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, N_FAST: tl.constexpr,
                           LOAD_STAGES: tl.constexpr):
        """Reads a [BLOCK_W word rows, BLOCK_N columns] tile per step over one K slice, as the GEMVs do, and
        only sums the words: how fast this load pattern alone can go (no unpack, no FMA). N_FAST: the tile's
        fast axis is N (N-contiguous storage, each word row a run of BLOCK_N words) else K."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, BLOCK_W)
        mask_n = offs_n < N
        w_lo = pid_k * W_PER_SPLIT
        w_hi = tl.minimum(w_lo + W_PER_SPLIT, K_WORDS)
        if N_FAST:
            acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.int32)
            ptrs = qw_ptr + offs_n[None, :] * stride_n + offs_w[:, None] * stride_w
            for w0 in tl.range(w_lo, w_hi, BLOCK_W, num_stages=LOAD_STAGES):
                acc += tl.load(ptrs + w0 * stride_w, mask=mask_n[None, :], other=0)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.int32)
            ptrs = qw_ptr + offs_n[:, None] * stride_n + offs_w[None, :] * stride_w
            for w0 in tl.range(w_lo, w_hi, BLOCK_W, num_stages=LOAD_STAGES):
                acc += tl.load(ptrs + w0 * stride_w, mask=mask_n[:, None], other=0)
        tl.store(out_ptr + pid_k * tl.num_programs(0) + pid_n, tl.sum(tl.sum(acc, axis=1), axis=0))


def read_roofline(K: int, N: int, rep: int) -> dict:
    """TB/s of int4 words read by `_read_words_kernel` per (layout, tile, warps, stages, programs): the load
    patterns' ceiling, to tell a GEMV's memory pattern from its math (METHOD.md: time what you leave out)."""
    n_words = K // 8
    words_n = torch.randint(-2**31, 2**31 - 1, (n_words, N), dtype=torch.int32, device="cuda")  # N-contiguous
    words_k = torch.randint(-2**31, 2**31 - 1, (N, n_words), dtype=torch.int32, device="cuda")  # K-contiguous
    copies, calls = rotation(words_n.numel() * 4)
    rows = {}
    for n_fast, base in ((True, words_n), (False, words_k)):
        bufs = [base] + [base.clone() for _ in range(copies - 1)]
        tiles = ((64, 16), (128, 16), (256, 16), (128, 32), (256, 32), (512, 16), (128, 64)) if n_fast else \
            ((16, 128), (16, 256), (32, 128), (8, 512), (16, 512), (32, 64))
        for bn, bw in tiles:
            for warps in (2, 4, 8):
                for stages in (1, 3):
                    for per_sm in (4, 16):
                        split = 1
                        while cdiv(N, bn) * split < per_sm * 132 and n_words // (split * 2) >= bw:
                            split *= 2
                        wps = cdiv(n_words, split)
                        out = torch.empty(split * cdiv(N, bn), dtype=torch.int32, device="cuda")

                        def make(i, bn=bn, bw=bw, warps=warps, stages=stages, split=split, wps=wps, out=out, bufs=bufs):
                            w = bufs[i]
                            grid = (cdiv(N, bn), split)
                            sn, sw = (w.stride(1), w.stride(0)) if n_fast else (w.stride(0), w.stride(1))
                            return lambda: _read_words_kernel[grid](w, out, N, n_words, wps, sn, sw, BLOCK_N=bn,
                                                                    BLOCK_W=bw, N_FAST=n_fast, LOAD_STAGES=stages,
                                                                    num_warps=warps, num_stages=1)
                        try:
                            us = 1e3 * time_graph_ms(make, copies, calls, rep)
                        except Exception as e:  # a config that does not compile is a row, not a crash
                            print(f"  read {'N' if n_fast else 'K'}-fast {bn}x{bw} w{warps} s{stages}: {e}")
                            continue
                        key = f"{'N' if n_fast else 'K'}-fast BLOCK_N={bn} BLOCK_W={bw} warps={warps} " \
                              f"stages={stages} split={split}"
                        rows[key] = round(n_words * N * 4 / us / 1e6, 3)
        del bufs
    best = sorted(rows.items(), key=lambda kv: -kv[1])
    for k, v in best[:12]:
        print(f"  read roofline K={K} N={N}: {v:.2f} TB/s  {k}")
    return {"tbps": rows, "best": best[:12]}


SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096)]
MS = [1, 2, 4, 16, 64, 256]
GROUP = 128


def make_weights(N: int, K: int, g: int, device: str, symmetric: bool = False):
    """Random int4 weights in kernopt's storage (logical [N, ...], N-contiguous; see kernopt/int4.py); symmetric:
    no zero points (zero 8, what optimize(quantize="int4") makes by default)."""
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=device).t()
    scales = (torch.rand(K // g, N, device=device) * 0.01 + 0.005).to(torch.bfloat16).t()
    zeros = None if symmetric else torch.randint(0, 16, (K // g, N), device=device).to(torch.bfloat16).t()
    return qweight, scales, zeros


class Operands:
    """Copies of one case's operands at other addresses (same values), for L2 rotation."""

    def __init__(self, x, qweight, scales, zeros, w_bf16, x_int4=None):
        weight_bytes = qweight.numel() * 4 + scales.numel() * scales.element_size() * 2
        self.int4_copies, self.int4_calls = rotation(weight_bytes + x.numel() * x.element_size())
        self.bf16_copies, self.bf16_calls = rotation(w_bf16.numel() * w_bf16.element_size())
        n = max(self.int4_copies, self.bf16_copies)
        self.x = [x] + [x.clone() for _ in range(n - 1)]
        # the int4 kernels' x (--x-fp32: x in float32, what the int4 pass hands a GEMV; same values)
        self.xi = self.x if x_int4 is None else [x_int4] + [x_int4.clone() for _ in range(n - 1)]
        self.q = [(qweight, scales, zeros)] + [(qweight.clone(memory_format=torch.preserve_format),
                                                scales.clone(memory_format=torch.preserve_format),
                                                None if zeros is None else
                                                zeros.clone(memory_format=torch.preserve_format))
                                               for _ in range(self.int4_copies - 1)]
        self.w = [w_bf16] + [w_bf16.clone() for _ in range(self.bf16_copies - 1)]

    def int4_us(self, cfg, rep: int) -> float:
        def make(i):
            x, (qw, s, z) = self.xi[i], self.q[i]
            return lambda: int4_gemm(x, qw, s, z, GROUP, config=cfg)
        return 1e3 * time_graph_ms(make, self.int4_copies, self.int4_calls, rep)

    def bf16_us(self, rep: int) -> float:
        def make(i):
            x, w = self.x[i], self.w[i]
            return lambda: F.linear(x, w)
        return 1e3 * time_graph_ms(make, self.bf16_copies, self.bf16_calls, rep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two cases only (a smoke run)")
    parser.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    parser.add_argument("--tune", action="store_true", help="also time every candidate config per case")
    parser.add_argument("--only", default="", help="run only cases whose name contains this text")
    parser.add_argument("--ms", default="",
                        help="run these M instead of the suite's (plus- or comma-separated, e.g. 2+4+8)")
    parser.add_argument("--read-roofline", action="store_true",
                        help="also time a words-only read kernel per (K, N), layouts and tiles (TB/s), then exit")
    parser.add_argument("--impls", default="", help="--tune: time only these impls' candidates (e.g. gemv2+tiled3)")
    parser.add_argument("--filter", default="", help="--tune: time only candidates whose config text contains this "
                        "(e.g. PAIRS=1)")
    parser.add_argument("--x-fp32", action="store_true",
                        help="the int4 kernels read x in float32 (same values; cuBLAS keeps bf16): what the int4 "
                             "pass gives GEMV launches (passes/int4.py float_gemv_inputs); suite gemm_int4_xfp32")
    parser.add_argument("--symmetric", action="store_true",
                        help="weights without zero points (optimize()'s default); JSON gemm_int4_sym-<gpu>.json")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    parser.add_argument("--shapes", default="", help="(K, N) pairs instead of the suite's, plus-separated KxN, e.g. "
                        "4096x6144+4096x28672 (Llama-3-8B's grouped q/k/v and gate/up launches)")
    args = parser.parse_args()
    require_cuda("bench_gemm_int4.py")

    from kernopt.kernels.int4_gemm import (candidate_configs, dequantize_int4, format_config, int4_dequantize,
                                           select_config)

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split("+") if s] or SHAPES
    ms = sorted({int(m) for m in args.ms.replace("+", ",").split(",") if m}) or MS  # any M, e.g. 2+4+8
    cases = [(m, k, n) for (k, n) in shapes for m in ms]
    if args.quick:
        cases = [(1, 4096, 14336), (64, 4096, 14336)]
    if args.only:
        cases = [c for c in cases if args.only in f"M={c[0]} K={c[1]} N={c[2]} g{GROUP}"]
    impls = {i for i in args.impls.replace("+", ",").split(",") if i}
    suite = Suite("gemm_int4" + ("_sym" if args.symmetric else "") + ("_xfp32" if args.x_fp32 else ""))
    torch.manual_seed(0)
    if args.read_roofline:
        roof = Suite("int4_read_roofline")
        for K, N in dict.fromkeys((k, n) for _, k, n in cases):
            r = read_roofline(K, N, 30)
            roof.add(f"K={K} N={N}", "TB/s", True, {"best_read": r["best"][0][1]}, best_config=r["best"][0][0],
                     all_tbps=r["tbps"])
        print(f"wrote {roof.write(args.out)}")
        return
    for K, N in dict.fromkeys((k, n) for _, k, n in cases):
        qweight, scales, zeros = make_weights(N, K, GROUP, "cuda", args.symmetric)
        w_bf16 = dequantize_int4(qweight, scales, zeros, GROUP, torch.bfloat16)  # the plain-torch reference
        assert torch.equal(int4_dequantize(qweight, scales, zeros, GROUP, torch.bfloat16), w_bf16)
        w_exact = dequantize_int4(qweight, scales, zeros, GROUP, torch.float64)
        for M in [m for m, k, n in cases if (k, n) == (K, N)]:
            case = f"M={M} K={K} N={N} g{GROUP}"
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            xi = x.float() if args.x_fp32 else x  # the int4 kernels' x
            cfg = select_config(M, N, K, GROUP, symmetric=zeros is None and not args.x_fp32, x_dtype=xi.dtype)
            # The reference: the exact product, (q - z) * s in float64 (exact for int4 codes and bf16
            # scales). The kernels differ from it by bf16 rounding: of each weight (the tensor-core kernels
            # round the dequantized weight to bf16, as int4_gemm_ref does) or of x's products (FMA
            # kernels keep the weight in fp32). Near-zero outputs of a K-long sum carry that rounding in
            # absolute terms, so atol is scaled to the outputs' RMS (kernopt.tolerance.mismatch).
            expected = F.linear(x.double(), w_exact)
            close = lambda o: mismatch(o, expected, torch.bfloat16, scale=2.0, magnitude=rms(expected))  # noqa: E731
            out = torch.full((M, N), float("nan"), device="cuda", dtype=xi.dtype)
            error = None
            try:
                int4_gemm(xi, qweight, scales, zeros, GROUP, config=cfg, out=out)
                torch.cuda.synchronize()
                error = close(out)
            except Exception as e:  # a failing kernel is a result row, not a crash of the suite
                error = f"{type(e).__name__}: {e}"
            results: dict[str, float] = {}
            extra = {"timing": "cuda_graph_replay_rotated"}
            ops = Operands(x, qweight, scales, zeros, w_bf16, xi if args.x_fp32 else None)
            if error is None:
                results["kernopt"] = ops.int4_us(cfg, args.rep)
                extra["kernopt_eager_launch_us"] = round(1e3 * time_ms(
                    lambda: int4_gemm(xi, qweight, scales, zeros, GROUP, config=cfg), rep=args.rep), 3)
            results["bf16_cublas"] = ops.bf16_us(args.rep)
            if not args.x_fp32:  # (with float32 x it would time a float32 GEMM, no one's fallback)
                results["dequant_cublas"] = ops.int4_us({"impl": "dequant_cublas"}, args.rep)
            if args.tune:
                best, best_us = None, float("inf")
                per_impl: dict[str, tuple[float, dict]] = {}
                all_us: dict[str, float] = {}
                for cand in candidate_configs(M, N, K, GROUP):
                    if (impls and cand["impl"] not in impls) or args.filter not in format_config(cand):
                        continue
                    try:
                        o = int4_gemm(xi, qweight, scales, zeros, GROUP, config=cand)
                        if close(o) is not None:
                            print(f"  {case}: {format_config(cand)} failed the check, skipped")
                            continue
                        us = ops.int4_us(cand, 30)
                        # again after the replays: the single-pass split-K kernels must leave their
                        # arrival counters re-armed, or this call reads stale partials
                        o = int4_gemm(xi, qweight, scales, zeros, GROUP, config=cand)
                        if close(o) is not None:
                            print(f"  {case}: {format_config(cand)} wrong after graph replays, skipped")
                            continue
                    except Exception as e:
                        print(f"  {case}: {format_config(cand)} raised {type(e).__name__}: {e}")
                        continue
                    print(f"    {us:8.2f} us  {format_config(cand)}")
                    all_us[format_config(cand)] = round(us, 3)
                    if us < best_us:
                        best, best_us = cand, us
                    if us < per_impl.get(cand["impl"], (float("inf"),))[0]:
                        per_impl[cand["impl"]] = (us, cand)
                if best is not None:
                    extra.update({"tuned_best_us": round(best_us, 3), "tuned_best_config": format_config(best)})
                    # the best per implementation, so the table can be set from one run
                    extra["tuned_best_per_impl"] = {impl: {"us": round(us, 3), "config": format_config(c)}
                                                    for impl, (us, c) in sorted(per_impl.items())}
                    extra["tuned_all_us"] = all_us
                    print(f"  {case}: best {best_us:.2f} us with {format_config(best)}")
                    for impl, (us, c) in sorted(per_impl.items()):
                        print(f"    {impl:15s} {us:8.2f} us  {format_config(c)}")
            del ops
            suite.add(case, "µs", False, results, config=format_config(cfg), error=error, **extra)
            print(f"{case}: " + " ".join(f"{k}={v:.2f}" for k, v in results.items()) + (f" ERROR {error}" if error else ""))
    print(suite.table())
    path = suite.write(args.out, plot=args.plot)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
