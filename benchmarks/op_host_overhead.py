"""Host (Python) cost of one kernopt int4 / flash_attention op call, Triton launches stubbed out: runs on a CPU.

Why: the compiled prompt forward runs without CUDA graphs, so every kernopt op's Python sits on the critical
path of a generate call (H200 profile, benchmarks/NOTES.md: 9 ms of GPU time in a 55-85 ms generate-1-token
call of the 8B int4 model, ~400 us of CPU per int4 op call under the profiler). This times what is left of a
call when the kernels cost nothing: the custom-op dispatch, the config lookup, the launcher's checks and
allocations. The Triton launch itself (binding, specialisation key) is not included: it needs a GPU.

    python benchmarks/op_host_overhead.py [--m 128] [--calls 500] [--rounds 1] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch


class _NoLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=128, help="rows of x (the prompt length at bs1)")
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds per op; the best is printed (noisy hosts)")
    ap.add_argument("--profile", action="store_true", help="also print cProfile's top functions per op")
    args = ap.parse_args()

    import kernopt.ops as ops
    from kernopt.kernels import flash_attention as fa, int4_gemm as q4

    for name in [n for n in dir(q4) if n.startswith("_") and n.endswith("_kernel")]:
        setattr(q4, name, _NoLaunch())
    fa._flash_attention_fwd = _NoLaunch()
    ops.implementation = lambda t: "triton"  # the GPU's code path, on CPU tensors

    K, g = 4096, 128
    widths = (4096, 1024, 1024)  # Llama-3-8B's q / k / v
    x = torch.randn(args.m, K, dtype=torch.bfloat16)
    qweight = torch.zeros(K // 8, sum(widths), dtype=torch.int32).t()  # kernopt's N-contiguous storage
    scales = torch.ones(K // g, sum(widths), dtype=torch.bfloat16).t()
    cols = [0, widths[0], widths[0] + widths[1], sum(widths)]
    parts = [(qweight[a:b], scales[a:b]) for a, b in zip(cols, cols[1:])]
    calls = {
        "int4_linear": lambda: torch.ops.kernopt.int4_linear.default(x, qweight, scales, None, g, None),
        "int4_linear_group (3 parts)": lambda: torch.ops.kernopt.int4_linear_group.default(
            x, [q for q, _ in parts], [s for _, s in parts], [None] * 3, g, [None] * 3),
        "int4_gemm (launcher only)": lambda: q4.int4_gemm(x, qweight, scales, None, g),
    }
    # the prompt's causal attention at Llama-3-8B's heads (GQA 32 / 8, head dim 128)
    q = torch.randn(1, 32, args.m, 128, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, args.m, 128, dtype=torch.bfloat16) for _ in range(2))
    calls["flash_attention"] = lambda: torch.ops.kernopt.flash_attention.default(q, k, v, None, True, 128 ** -0.5)
    calls["flash_attention (launcher only)"] = lambda: fa.flash_attention(q, k, v, None, True, 128 ** -0.5)
    # HF's prompt passes its causal mask as a bool [B, 1, S, S] tensor: supports() checks its broadcast every call
    mask = torch.ones(1, 1, args.m, args.m, dtype=torch.bool).tril()
    calls["flash_attention (bool mask, launcher only)"] = lambda: fa.flash_attention(q, k, v, mask, False, 128 ** -0.5)
    for name, call in calls.items():
        for _ in range(20):
            call()
        best = float("inf")
        for _ in range(max(1, args.rounds)):
            start = time.perf_counter()
            for _ in range(args.calls):
                call()
            best = min(best, time.perf_counter() - start)
        us = best / args.calls * 1e6
        print(f"{name:44s} {us:8.1f} us per call (M={args.m}, Triton launches stubbed)")
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(lambda: [call() for _ in range(args.calls)])
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
