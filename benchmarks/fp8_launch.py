"""Launch one fp8 decode GEMM (kernels/fp8_gemm.py, e4m3 x e4m3) a few times: a target for Nsight Compute (no timing of
its own). The twenty-second session's question (benchmarks/NOTES.md, runbook 000): the one-row gemv moves 2.2-3.4 TB/s
where the bf16 gemv moves 3.4-4.2, and neither its instruction count nor its load placement was the limit; read the
DRAM side (throughput, sectors per request, L2 hit rate) of the table's tiles.

    ncu --clock-control none --kernel-name regex:_gemv_kernel --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section Occupancy \
        --section WarpStateStats python benchmarks/fp8_launch.py --k 4096 --n 4096 [--config '{"BLOCK_N": 16, ...}']

`--config` is a JSON dict merged into select_config's pick (e.g. another tile); the pick is printed first.
"""
from __future__ import annotations

import argparse
import json

import torch

from kernopt.kernels import fp8_gemm as fp8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--config", default="", help="JSON merged into select_config's pick")
    ap.add_argument("--calls", type=int, default=4)
    args = ap.parse_args()
    M, K, N = args.m, args.k, args.n
    w_fp8, w_scale = fp8.quantize_weight_fp8(torch.randn(N, K, device="cuda") / K ** 0.5)
    a, sa = fp8.quantize_rows_fp8(torch.randn(M, K, device="cuda", dtype=torch.bfloat16))
    cfg = {**fp8.select_config(M, N, K), **(json.loads(args.config) if args.config else {})}
    print(fp8.config_str(cfg))
    for _ in range(args.calls):
        fp8.fp8_scaled_mm(a, w_fp8.t(), sa, w_scale.reshape(1, N), out_dtype=torch.bfloat16, config=cfg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
