"""Benchmark suite `gemm_fp8`: kernopt's FP8 GEMM against cuBLAS `torch._scaled_mm` (row-wise scales) and bf16 cuBLAS.

Timing: every system is timed the same way, as CUDA-graph replay (median of repeats) of a graph that calls
it on several copies of the inputs in turn, enough copies to overflow the 50 MB L2, so weights stream from
HBM as in a model. Graph replay leaves out the Python launch cost (tens of microseconds for a Triton
launch with tensor descriptors, more than the kernel itself at small M), which is how kernopt runs inside
a compiled model with CUDA graphs (`mode="reduce-overhead"`); `--do-bench` times with do_bench instead.

Every case multiplies a row-wise-quantized e4m3 activation [M, K] by an e4m3 weight [N, K] with
per-output-channel scales, bf16 output; kernopt's number is `fp8_scaled_mm` with the config
`select_config` picks, checked against `fp8_scaled_mm_ref` in the same run. Unless `--no-sweep`, every
config of `candidate_configs` is timed too (row field `candidates`, printed below the table), so one run
says whether the table picks the best. The row field `fp8_linear_tflops` times `fp8_linear` (per-token
activation quantization of a bf16 x included).

    python examples/bench_gemm_fp8.py [--quick | --decode] [--no-sweep] [--filter S] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys

import torch

from kernopt.benchmark import Suite, require_cuda, rotation, time_graph_ms, time_ms
from kernopt.tolerance import mismatch

CASES = [(m, k, k) for k in (4096, 8192) for m in (16, 128, 1024, 4096, 8192)] + [(4096, 4096, 14336)]
QUICK = [(16, 4096, 4096), (4096, 4096, 4096)]
# --decode: one token through each linear of a Llama-3-8B layer as kernopt_fp8 runs them (q / o, k / v, gate / up,
# down), and 16 tokens through q / o
DECODE = [(1, 4096, 4096), (1, 4096, 1024), (1, 4096, 14336), (1, 14336, 4096), (16, 4096, 4096)]




def graph_ms(make_call, bytes_per_call: int, reps: int = 30) -> float:
    """Median ms per call: CUDA-graph replay of make_call(i)() for i over copies that overflow L2."""
    copies, _ = rotation(bytes_per_call)
    return time_graph_ms(make_call, copies, copies, rep=max(reps, 20))


def tflops(M, N, K, ms):
    return 2.0 * M * N * K / (ms * 1e-3) / 1e12


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two cases, for a smoke run")
    ap.add_argument("--decode", action="store_true", help="decode rows at Llama-8B's linear shapes instead")
    ap.add_argument("--no-sweep", action="store_true", help="time only the config select_config picks")
    ap.add_argument("--filter", default=None,
                    help="sweep only the candidates whose config string contains this (e.g. swapab)")
    ap.add_argument("--rep", type=int, default=60, help="do_bench repetition time in ms (with --do-bench)")
    ap.add_argument("--do-bench", action="store_true", help="time with triton do_bench (Python launch included)")
    ap.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    args = ap.parse_args(argv)
    require_cuda("bench_gemm_fp8.py")

    from kernopt.kernels import fp8_gemm as fp8

    suite = Suite("gemm_fp8")
    sweeps = []
    for M, K, N in (QUICK if args.quick else DECODE if args.decode else CASES):
        case = f"M={M} K={K} N={N}"
        torch.manual_seed(0)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        w_fp8, w_scale = fp8.quantize_weight_fp8(w)
        a, sa = fp8.quantize_rows_fp8(x)
        b, sb = w_fp8.t(), w_scale.reshape(1, N)
        # copies of the operands for L2 rotation: same values, other addresses
        fp8_ops = [(a, b)] + [(a.clone(), w_fp8.clone().t()) for _ in range(15)]
        bf16_ops = [(x, w)] + [(x.clone(), w.clone()) for _ in range(15)] if M * K + N * K < 2**28 else [(x, w)] * 16
        lin_ops = [(x, w_fp8)] + [(op[0], op[1].t()) for op in fp8_ops[1:]]
        lin_ops = [(bf16_ops[i][0], lin_ops[i][1]) for i in range(16)]

        def bench(call, bytes_per_call):
            """call(a, b) on fp8 copies by default; the systems pass their own operand lists via closures."""
            if args.do_bench:
                return time_ms(lambda: call(0), warmup=10, rep=args.rep)
            return graph_ms(lambda i: (lambda: call(i)), bytes_per_call)

        fp8_bytes = M * K + N * K + 2 * M * N
        bf16_bytes = 2 * (M * K + N * K + M * N)

        results, error, extra = {}, None, {}
        cfg = fp8.select_config(M, N, K)
        try:
            ref = fp8.fp8_scaled_mm_ref(a, b, sa, sb, out_dtype=torch.bfloat16)
            out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
            fp8.fp8_scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16, out=out)
            error = mismatch(out, ref, torch.bfloat16)
            if error is None:
                results["kernopt"] = tflops(M, N, K, bench(
                    lambda i: fp8.fp8_scaled_mm(*fp8_ops[i], sa, sb, out_dtype=torch.bfloat16), fp8_bytes))
        except Exception as e:  # a compile/launch failure is a result of this run, not a crash
            error = f"{type(e).__name__}: {e}"[:300]
        results["cublas_scaled_mm_rowwise"] = tflops(M, N, K, bench(
            lambda i: torch._scaled_mm(*fp8_ops[i], scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16), fp8_bytes))
        # context, not a required baseline: cuBLAS with fp8 fast accumulation, the tensor cores' own
        # reduced-precision accumulation that Triton's fp8 tl.dot also uses on Hopper
        results["cublas_scaled_mm_rowwise_fast_accum"] = tflops(M, N, K, bench(
            lambda i: torch._scaled_mm(*fp8_ops[i], scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                       use_fast_accum=True), fp8_bytes))
        results["bf16_cublas"] = tflops(M, N, K, bench(lambda i: torch.nn.functional.linear(*bf16_ops[i]),
                                                       bf16_bytes))
        try:
            y = fp8.fp8_linear(x, w_fp8, w_scale)
            lin_err = mismatch(y, fp8.fp8_linear_ref(x, w_fp8, w_scale), torch.bfloat16)
            extra["fp8_linear_tflops"] = (round(tflops(M, N, K, bench(
                lambda i: fp8.fp8_linear(lin_ops[i][0], lin_ops[i][1], w_scale), fp8_bytes + 2 * M * K)), 2)
                                          if lin_err is None else f"error: {lin_err}")
        except Exception as e:
            extra["fp8_linear_tflops"] = f"error: {type(e).__name__}: {e}"[:300]

        if not args.no_sweep:
            cands = {}
            for c in fp8.candidate_configs(M, N, K):
                if args.filter and args.filter not in fp8.config_str(c):
                    continue
                try:
                    o = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                    fp8.fp8_scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16, config=c, out=o)
                    bad = mismatch(o, ref, torch.bfloat16)
                    cands[fp8.config_str(c)] = "wrong" if bad else round(tflops(M, N, K, bench(
                        lambda i: fp8.fp8_scaled_mm(*fp8_ops[i], sa, sb, out_dtype=torch.bfloat16, config=c),
                        fp8_bytes)), 1)
                except Exception as e:
                    cands[fp8.config_str(c)] = f"{type(e).__name__}"
            extra["candidates"] = cands
            sweeps.append((case, cands))
        suite.add(case, "TFLOP/s", True, results, config=fp8.config_str(cfg), error=error, **extra)
        print(f"{case}: " + " ".join(f"{k}={v:.1f}" for k, v in results.items()) + (f" error={error}" if error else ""),
              file=sys.stderr, flush=True)
        del x, w, w_fp8, a, b, fp8_ops, bf16_ops, lin_ops
        torch.cuda.empty_cache()

    print(suite.table())
    for case, cands in sweeps:
        nums = {k: v for k, v in cands.items() if isinstance(v, float)}
        best = max(nums, key=nums.get) if nums else None
        print(f"\n{case}: candidates (best: {best})")
        for k, v in cands.items():
            print(f"  {v!s:>8}  {k}")
    path = suite.write(args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
