"""Does the llama suite's nvidia-smi sampler (kernopt.llama_bench.GpuSampler) slow the GPU work it watches?

    python benchmarks/sampler_probe.py [--rounds 8] [--out DIR]   # JSON: DIR/sampler_probe-<gpu>.json

The 8B int4 decode step ran 2.96 ms with the sampler polling (sweeps/pdl, c0e8a0e) against 2.70 ms in 5 of 6
earlier runs without it. Here the same kernels are timed with and without the sampler running, alternating
rounds in one process: the int4 GEMV of the suite's shape (M=1 K4096 N14336, the table's config) and the bf16
decode attention of B1 S8192, each from one CUDA graph of many calls replayed for ~200 ms (two or more samples of the 100 ms polling), inputs rotated past the L2 (benchmark.py's
time_graph_ms). A sampler that perturbs the GPU shows as a gap between the two columns beyond the rounds' spread.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from kernopt.benchmark import Suite, require_cuda, rotation, time_graph_ms
from kernopt.llama_bench import GpuSampler


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    require_cuda("sampler_probe.py")
    from kernopt.kernels.decode_attention import decode_attention
    from kernopt.kernels.int4_gemm import int4_gemm

    K, N, g = 4096, 14336, 128
    w_bytes = K * N // 2
    copies, calls = rotation(w_bytes)
    weights = [(torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device="cuda").t(),
                (torch.rand(K // g, N, device="cuda") * 0.01).to(torch.bfloat16).t()) for _ in range(copies)]
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    gemv = lambda i: (lambda: int4_gemm(x, weights[i][0], weights[i][1], None, g))  # noqa: E731
    S = 8192
    kv_bytes = 2 * 8 * S * 128 * 2
    a_copies, a_calls = rotation(kv_bytes)
    kv = [(torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16),
           torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16)) for _ in range(a_copies)]
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    attn = lambda i: (lambda: decode_attention(q, kv[i][0], kv[i][1]))  # noqa: E731

    samples = {"int4_gemv_us": {"off": [], "on": []}, "decode_attention_us": {"off": [], "on": []}}
    summaries = []
    for r in range(args.rounds):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            with (GpuSampler() if mode == "on" else contextlib.nullcontext()) as sampler:
                time.sleep(0.5)  # past nvidia-smi's start: the timed graphs run under its steady polling
                samples["int4_gemv_us"][mode].append(1e3 * time_graph_ms(gemv, copies, calls, 200))
                samples["decode_attention_us"][mode].append(1e3 * time_graph_ms(attn, a_copies, a_calls, 200))
            if sampler is not None:
                summaries.append(sampler.summary())
    suite = Suite("sampler_probe")
    for name, by_mode in samples.items():
        res = {f"sampler_{m}": statistics.median(v) for m, v in by_mode.items()}
        row = suite.add(name, "us", False, res, rounds={m: [round(t, 3) for t in v] for m, v in by_mode.items()})
        print(name, row["results"], row["rounds"], flush=True)
    suite.rows[-1]["sampler_summaries"] = summaries
    print(f"wrote {suite.write(args.out)}")


if __name__ == "__main__":
    main()
