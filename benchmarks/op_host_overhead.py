"""Host (Python) cost of one kernopt int4 / flash_attention op call: on a CPU with the Triton launches stubbed out,
or on a GPU with everything real (--device cuda).

Why: the compiled prompt forward runs without CUDA graphs, so every kernopt op's Python sits on the critical
path of a generate call (H200 profile, benchmarks/NOTES.md: 9 ms of GPU time in a 55-85 ms generate-1-token
call of the 8B int4 model, ~400 us of CPU per int4 op call under the profiler). On a CPU this times what is left
of a call when the kernels cost nothing: the custom-op dispatch, the config lookup, the launcher's checks and
allocations. --device cuda times the host's issue time per call with the real launches (Triton's binding and
specialisation included; no synchronisation inside the timed loop, so the GPU's own time is not counted while
the launch queue has room), beside an aten op, a bare custom op and a bare Triton launch of the same process:
what each layer of a call costs on the GPU host. The GPU time per call is printed beside it.

    python benchmarks/op_host_overhead.py [--m 128] [--calls 500] [--rounds 1] [--profile] [--device cuda]
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


def _probe_ops():
    """A custom op that does nothing but allocate its output (the dispatch's own cost) and a one-argument Triton
    kernel (a launch's floor), for --device cuda's comparison rows."""
    import triton
    import triton.language as tl

    @torch.library.custom_op("kernopt_probe::empty_like", mutates_args=())
    def empty_like(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    @empty_like.register_fake
    def _(x):
        return torch.empty_like(x)

    @triton.jit
    def _touch(p):
        tl.store(p, 0.0)

    return empty_like, _touch


def _time(call, calls: int, rounds: int, sync) -> float:
    """Best over rounds of the host's seconds per call (no synchronisation inside the timed loop)."""
    best = float("inf")
    for _ in range(max(1, rounds)):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, time.perf_counter() - start)
    sync()
    return best / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=128, help="rows of x (the prompt length at bs1)")
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds per op; the best is printed (noisy hosts)")
    ap.add_argument("--profile", action="store_true", help="also print cProfile's top functions per op")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: Triton launches stubbed out; cuda: every launch real, GPU time per call beside")
    args = ap.parse_args()

    import kernopt.ops as ops
    from kernopt.kernels import flash_attention as fa, int4_gemm as q4

    dev = args.device
    tail = "Triton launches stubbed" if dev == "cpu" else "host issue time; GPU"
    if dev == "cpu":
        for name in [n for n in dir(q4) if n.startswith("_") and n.endswith("_kernel")]:
            setattr(q4, name, _NoLaunch())
        fa._flash_attention_fwd = _NoLaunch()
        ops.implementation = lambda t: "triton"  # the GPU's code path, on CPU tensors
        sync = lambda: None  # noqa: E731
    else:
        sync = torch.cuda.synchronize

    K, g = 4096, 128
    widths = (4096, 1024, 1024)  # Llama-3-8B's q / k / v
    x = torch.randn(args.m, K, dtype=torch.bfloat16, device=dev)
    qweight = torch.zeros(K // 8, sum(widths), dtype=torch.int32, device=dev).t()  # kernopt's N-contiguous storage
    scales = torch.ones(K // g, sum(widths), dtype=torch.bfloat16, device=dev).t()
    cols = [0, widths[0], widths[0] + widths[1], sum(widths)]
    parts = [(qweight[a:b], scales[a:b]) for a, b in zip(cols, cols[1:])]
    calls = {}
    if dev == "cuda":
        empty_like, touch = _probe_ops()
        w = torch.randn(sum(widths), K, dtype=torch.bfloat16, device=dev)
        cell = torch.empty(1, device=dev)
        calls["torch.mm (bf16, same shapes)"] = lambda: torch.mm(x, w.t())
        calls["bare custom op (empty_like)"] = lambda: torch.ops.kernopt_probe.empty_like.default(x)
        calls["bare Triton launch (1 argument)"] = lambda: touch[(1,)](cell)
        calls["int4_dequantize (Triton launch + empty)"] = lambda: q4.int4_dequantize(qweight, scales, None, g)
    # int4_linear's layers, outermost last: what each adds
    from kernopt import workload

    m, n = args.m, sum(widths)
    bucket = workload.gemm_bucket(m, n, K, ops.int4_bucket_tag(g, True), x.dtype)
    calls.update({
        "torch.empty (the dequantized weight's)": lambda: torch.empty((n, K), dtype=x.dtype, device=dev),
        "select_config + _table_wgr": lambda: q4.select_config(
            m, n, K, g, symmetric=True, x_dtype=x.dtype, wgr=q4._table_wgr(x, qweight, scales, None, g)),
        "workload.config_for (its tuned-config lookup)": lambda: workload.config_for("int4_gemm", bucket, None, None),
        "ops._int4_gemm_tuned (no dispatch)": lambda: ops._int4_gemm_tuned(x, qweight, scales, None, g, None),
        "int4_linear's function (no dispatch)": lambda: ops.int4_linear._init_fn(x, qweight, scales, None, g, None),
        "int4_linear": lambda: torch.ops.kernopt.int4_linear.default(x, qweight, scales, None, g, None),
        "int4_linear_group (3 parts)": lambda: torch.ops.kernopt.int4_linear_group.default(
            x, [q for q, _ in parts], [s for _, s in parts], [None] * 3, g, [None] * 3),
        "int4_gemm (launcher only)": lambda: q4.int4_gemm(x, qweight, scales, None, g),
    })
    # the prompt's causal attention at Llama-3-8B's heads (GQA 32 / 8, head dim 128)
    q = torch.randn(1, 32, args.m, 128, dtype=torch.bfloat16, device=dev)
    k, v = (torch.randn(1, 8, args.m, 128, dtype=torch.bfloat16, device=dev) for _ in range(2))
    calls["flash_attention"] = lambda: torch.ops.kernopt.flash_attention.default(q, k, v, None, True, 128 ** -0.5)
    calls["flash_attention (launcher only)"] = lambda: fa.flash_attention(q, k, v, None, True, 128 ** -0.5)
    # HF's prompt passes its causal mask as a bool [B, 1, S, S] tensor: supports() checks its broadcast every call
    mask = torch.ones(1, 1, args.m, args.m, dtype=torch.bool, device=dev).tril()
    calls["flash_attention (bool mask)"] = lambda: torch.ops.kernopt.flash_attention.default(
        q, k, v, mask, False, 128 ** -0.5)
    calls["flash_attention (bool mask, launcher only)"] = lambda: fa.flash_attention(q, k, v, mask, False, 128 ** -0.5)
    if dev == "cuda":
        # The same int4 op as Inductor's generated code calls it: a stack of int4 linears (Llama-3.2-1B's width)
        # compiled with the kernopt backend, per int4 op; and the same ops called one after another in eager.
        from kernopt.int4 import Int4Linear

        layers = torch.nn.Sequential(*[Int4Linear.from_linear(torch.nn.Linear(
            2048, 2048, bias=False, device=dev, dtype=torch.bfloat16), g) for _ in range(8)])
        h = torch.randn(args.m, 2048, dtype=torch.bfloat16, device=dev)
        compiled = torch.compile(layers, backend="kernopt")
        mods = list(layers)

        def eager_chain():
            y = h
            for mod in mods:
                y = torch.ops.kernopt.int4_linear.default(y, mod.qweight, mod.scales, mod.zeros, g, None)
            return y

        # the prompt lane (kernopt/ops.py) on and off, alternated in this one process
        import os

        def lane(on: bool, f):
            def call():
                if not on:
                    ops._DEQUANT_LANE.clear()
                return f()
            return call

        for _ in range(3):
            for on in (True, False):
                os.environ[ops.LANE_ENV] = "1" if on else "0"
                with torch.no_grad():
                    _report(f"int4_linear, lane {'on' if on else 'off'}", lane(on, lambda: torch.ops.kernopt.int4_linear
                            .default(x, qweight, scales, None, g, None)), args, sync, dev, tail)
        os.environ.pop(ops.LANE_ENV)
        for name, call in (("8 int4 linears, kernopt-compiled", lambda: compiled(h)),
                           ("8 int4_linear ops in eager", eager_chain)):
            with torch.no_grad():
                _report_chain(name, call, args)
    for name, call in calls.items():
        with torch.no_grad():
            _report(name, call, args, sync, dev, tail)


def _report_chain(name, call, args, ops_per_call: int = 8) -> None:
    """A call of several ops: host issue time over 10 calls (few enough launches that the launch queue never fills
    and blocks the host) and the kernels' own time per call (profiler), per op."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        call()
    issue = _time(call, 10, args.rounds, torch.cuda.synchronize)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    gpu = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in kernels) / 5
    launches = sum(e.count for e in kernels) / 5 / ops_per_call
    print(f"{name:44s} {issue * 1e6 / ops_per_call:8.1f} us per op (M={args.m}, host issue time; GPU kernels "
          f"{gpu / ops_per_call:8.1f} us per op; {launches:.1f} kernels per op)")


def _report(name, call, args, sync, dev, tail) -> None:
    """One row: warm up, time, the GPU time per call beside (cuda), cProfile (--profile)."""
    for _ in range(20):
        call()
    us = _time(call, args.calls, args.rounds, sync) * 1e6
    gpu = ""
    if dev == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            call()
        end.record()
        sync()
        gpu = f" {start.elapsed_time(end) / 20 * 1e3:8.1f} us"
    print(f"{name:44s} {us:8.1f} us per call (M={args.m}, {tail}{gpu})")
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(lambda: [call() for _ in range(args.calls)])
        sync()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)

if __name__ == "__main__":
    main()
