"""Launch one int4_gemm shape a few times: a target for Nsight Compute (no timing of its own).

    ncu --clock-control none --kernel-name regex:_int4_ --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section SchedulerStats python benchmarks/int4_launch.py \
        --m 1 --k 4096 --n 14336 [--symmetric] [--config "impl=gemv2 BLOCK_N=128 ..."]

`--config` takes format_config's text (key=value, space separated); the default is select_config's pick.
"""
from __future__ import annotations

import argparse

import torch

from kernopt.kernels.int4_gemm import format_config, int4_gemm, select_config


def parse_config(text: str) -> dict:
    cfg = {}
    for item in text.split():
        k, v = item.split("=", 1)
        cfg[k] = v if k == "impl" else int(v)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--config", default="")
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--symmetric", action="store_true", help="no zero points (what optimize() quantizes to)")
    args = ap.parse_args()
    M, K, N, g = args.m, args.k, args.n, args.group
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device="cuda").t()
    scales = (torch.rand(K // g, N, device="cuda") * 0.01 + 0.005).to(torch.bfloat16).t()
    zeros = None if args.symmetric else torch.randint(0, 16, (K // g, N), device="cuda").to(torch.bfloat16).t()
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    # the table's pick for this launch: bf16 x (gemv2 PAIRS at M=1)
    cfg = parse_config(args.config) if args.config else select_config(M, N, K, g, zeros is None, x.dtype)
    print(format_config(cfg))
    for _ in range(args.calls):
        int4_gemm(x, qweight, scales, zeros, g, config=cfg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
