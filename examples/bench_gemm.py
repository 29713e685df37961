"""Benchmark suite "gemm": kernopt's fused-epilogue bf16 GEMM vs cuBLAS + Inductor's fused epilogue.

Cases (../shared/BENCHMARKS.md): Llama-8B projections at M in {1, 16, 256, 4096}, bf16, metric µs
(lower is better):

- ``mlp_swiglu`` K=4096 N=14336: silu(x @ w_gate.T) * (x @ w_up.T), one kernopt kernel;
- ``mlp_down``   K=14336 N=4096: plain x @ w.T;
- ``qkv``        K=4096 N=6144: plain x @ w.T (Llama), and ``qkv_bias`` with a bias (Qwen-style).

Systems, same process, same inputs:

- ``kernopt``: `gemm` with the config `select_config` picks, its output checked against an fp32
  reference first (a failed check writes the row with ``error`` and no kernopt number);
- ``bf16_cublas_plus_inductor``: the same computation in plain torch (F.linear, F.silu, *, bias),
  compiled with ``torch.compile(backend="inductor")``: cuBLAS matmuls plus one fused Triton
  pointwise kernel for the epilogue.

Each row also records what `prefer_triton` says for the shape ("triton" or its reason), so the
crossover table in kernels/gemm.py can be checked against the measured ratio. Inputs are random,
rotated over several copies when one set fits in L2 (do_bench clears L2 between repeats anyway).

    python examples/bench_gemm.py [--quick] [--out DIR] [--tune [--impls I+J]] [--graph] [--plot] [--rep MS]
                                  [--ms 1,4,16]

``--tune`` also times every `candidate_configs` entry per case (at M <= 16 all three kernels: the tiled
tl.dot kernel, the FMA gemv, ``impl=gemv``, and the swap-AB tensor-core kernel, ``impl=swapab``) and
records, beside the selected config's time (``kernopt``): ``tuned_best_us`` / ``tuned_best_config`` / ``tuned_best_impl`` (the fastest candidate,
its config line with its impl) and ``tuned_by_impl`` (the fastest candidate of each impl, time and
config), so that one GPU run says whether `GEMV_MAX_M` / `_GEMV_TILE` or `SWAPAB_MAX_M` / `_SWAPAB_TILES`
in kernels/gemm.py should change.
``--graph`` times every system by CUDA-graph replay (many calls per graph, inputs rotated through 3x the
L2, as bench_gemm_fp8.py and bench_decode.py do) instead of do_bench: decode-size calls take 20-100 us, the
size of a Python launch (two for the tiled kernel's split-K), and decode steps replay as graphs anyway.
Rows record ``timing`` ("graph" or "do_bench"). ``--impls swapab+tiled`` limits the --tune sweep to those impls.
``--ms`` replaces the M values (e.g. ``--ms 1,2,4,8,16`` for the gemv crossover; ``+`` also separates
them, for benchmarks/run_gpu.sh, which turns commas into spaces: ``gemm:--tune,--ms,1+4+16``).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from kernopt.benchmark import L2_BYTES, Suite, require_cuda, rotation, time_graph_ms, time_rotating_ms
from kernopt.tolerance import mismatch

# (name, K, N, activation, bias)
SHAPES = [
    ("mlp_swiglu", 4096, 14336, "swiglu", False),
    ("mlp_down", 14336, 4096, "none", False),
    ("qkv", 4096, 6144, "none", False),
    ("qkv_bias", 4096, 6144, "none", True),
]
MS = [1, 16, 256, 4096]



def baseline_fn(activation: str):
    """The eager pattern kernopt replaces, compiled by Inductor (cuBLAS + fused epilogue)."""
    if activation == "swiglu":
        def fn(x, w, bias, w_up):
            return F.silu(F.linear(x, w)) * F.linear(x, w_up)
    else:
        def fn(x, w, bias, w_up):
            return F.linear(x, w, bias)
    return torch.compile(fn, backend="inductor", dynamic=False)


def make_inputs(M, K, N, activation, with_bias):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(N, K, device="cuda") / math.sqrt(K)).to(torch.bfloat16)
    w_up = (torch.randn(N, K, device="cuda") / math.sqrt(K)).to(torch.bfloat16) if activation == "swiglu" else None
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16) if with_bias else None
    return x, w, bias, w_up


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two cases only (a smoke run)")
    parser.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    parser.add_argument("--tune", action="store_true", help="also time every candidate config per case")
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    parser.add_argument("--impls", default=None,
                        help="with --tune: only candidates of these impls, separated by ',' or '+' (e.g. swapab+tiled)")
    parser.add_argument("--graph", action="store_true",
                        help="time by CUDA-graph replay (no Python launch cost) instead of do_bench")
    parser.add_argument("--ms", default=None,
                        help="M values separated by ',' or '+' (default: %s)" % ",".join(map(str, MS)))
    args = parser.parse_args()
    require_cuda("bench_gemm.py")

    from kernopt.kernels.gemm import (candidate_configs, format_config, gemm, gemm_ref, prefer_triton,
                                      select_config)

    ms = [int(m) for m in args.ms.replace("+", ",").split(",") if m] if args.ms else MS
    cases = [(m, s) for s in SHAPES for m in ms]
    if args.quick:
        cases = [(16, SHAPES[0]), (4096, SHAPES[1])]
    suite = Suite("gemm")
    torch.manual_seed(0)
    for M, (name, K, N, activation, with_bias) in cases:
        case = f"M={M} {name} K={K} N={N}"
        torch._dynamo.reset()  # one compile per case: no recompile limits, no dynamic shapes
        x, w, bias, w_up = make_inputs(M, K, N, activation, with_bias)
        set_bytes = nbytes(x, w, bias, w_up)
        if args.graph:
            copies, calls = rotation(set_bytes)
        else:
            copies = min(4, max(1, math.ceil(2 * L2_BYTES / set_bytes)))

        def timed_us(make_call, rep):
            if args.graph:
                return 1e3 * time_graph_ms(make_call, copies, calls, rep=max(20, rep // 2))
            return 1e3 * time_rotating_ms(make_call, copies, rep=rep)

        sets = [(x, w, bias, w_up)] + [make_inputs(M, K, N, activation, with_bias) for _ in range(copies - 1)]
        cfg = select_config(M, N, K, activation, torch.bfloat16)

        f32 = lambda t: None if t is None else t.float()  # noqa: E731
        expected = gemm_ref(f32(x), f32(w), f32(bias), f32(w_up), activation)  # fp32 (TF32 off): exact enough
        error = None
        try:
            out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
            gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=cfg, out=out)
            torch.cuda.synchronize()
            error = mismatch(out, expected, torch.bfloat16)
        except Exception as e:  # a failing kernel is a result row, not a crash of the suite
            error = f"{type(e).__name__}: {e}"

        def kernopt_call(i, c=cfg):
            xs, ws, bs, us = sets[i]
            return lambda: gemm(xs, ws, bias=bs, w_up=us, activation=activation, config=c)

        compiled = baseline_fn(activation)

        def baseline_call(i):
            xs, ws, bs, us = sets[i]
            return lambda: compiled(xs, ws, bs, us)

        results: dict[str, float] = {}
        if error is None:
            results["kernopt"] = timed_us(kernopt_call, args.rep)
        base_err = mismatch(compiled(x, w, bias, w_up), expected, torch.bfloat16)  # also warms the compile
        extra = {"prefer_triton": prefer_triton(M, N, K, activation, torch.bfloat16) or "triton",
                 "timing": "graph" if args.graph else "do_bench"}
        try:
            results["bf16_cublas_plus_inductor"] = timed_us(baseline_call, args.rep)
        except Exception as e:  # e.g. a capture the compiled baseline does not survive: a row, not a crash
            extra["baseline_error"] = f"{type(e).__name__}: {e}"[:300]
        if base_err:
            extra["baseline_check"] = base_err
        print(f"{case}: " + " ".join(f"{k}={v:.2f}" for k, v in results.items())
              + f"  [{extra['prefer_triton']}]" + (f" ERROR {error}" if error else ""), flush=True)
        if args.tune:
            best, best_us = None, float("inf")
            by_impl: dict[str, dict] = {}  # impl -> {"us": fastest time, "config": its config line}
            impls = set(args.impls.replace("+", ",").split(",")) if args.impls else None
            for cand in candidate_configs(M, N, K, activation):
                if impls is not None and cand.get("impl", "tiled") not in impls:
                    continue
                try:
                    o = gemm(x, w, bias=bias, w_up=w_up, activation=activation, config=cand)
                    if mismatch(o, expected, torch.bfloat16) is not None:
                        print(f"  {case}: candidate {format_config(cand)} is WRONG")
                        continue
                    us = timed_us(lambda i, c=cand: kernopt_call(i, c), 30)
                except Exception as e:
                    print(f"  {case}: candidate {format_config(cand)} failed: {type(e).__name__}")
                    continue
                print(f"    {us:9.2f} us  {format_config(cand)}")
                if us < best_us:
                    best, best_us = cand, us
                impl = cand.get("impl", "tiled")
                if us < by_impl.get(impl, {}).get("us", float("inf")):
                    by_impl[impl] = {"us": round(us, 3), "config": format_config(cand)}
            if best is not None:
                extra.update(tuned_best_us=round(best_us, 3), tuned_best_config=format_config(best),
                             tuned_best_impl=best.get("impl", "tiled"), tuned_by_impl=by_impl)
                sel = results.get("kernopt")
                print(f"  {case}: best {best_us:.2f} us with {format_config(best)}"
                      + (f" (selected {sel:.2f} us)" if sel else "")
                      + "".join(f"; best {i} {v['us']:.2f} us" for i, v in sorted(by_impl.items())))
        suite.add(case, "µs", False, results, config=format_config(cfg), error=error, **extra)
        sets = x = w = bias = w_up = expected = None  # free this case's tensors before the next one
    print(suite.table())
    path = suite.write(args.out, plot=args.plot)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
