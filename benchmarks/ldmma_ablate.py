"""Where the ldmma int4 kernel's time goes: configs timed whole and with parts of their step left out.

    python benchmarks/ldmma_ablate.py [--out DIR] [--ms 1,4]   (GPU; writes DIR/ldmma_ablate-<gpu>.json)

Per (M, K, N) and weights with / without zero points (group 128), each config (kernels/int4_ldmma.py), on the words
in kernopt's N-contiguous format and in ldmma_tile's (a program's words contiguous), is timed as the gemm_int4 suite
times it (CUDA-graph replay, inputs rotated past the L2) in three forms (`_ld_step`, ABLATE):
  full       the kernel as int4_gemm runs it (checked against int4_gemm_ref in float64)
  no_unpack  the word bits go to the MMA as they are (no shift / LOP3 / subtraction)
  loads      neither unpack nor MMA nor x: the words summed per column, scaled (the loads, the loop, the epilogue)
plus bf16 cuBLAS on the same shape. The ablated outputs are wrong by design and are not checked. METHOD.md: time what
you leave out; the differences say what bounds the step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kernopt.benchmark import Suite, require_cuda, rotation, time_graph_ms
from kernopt.kernels.int4_gemm import dequantize_int4, int4_gemm
from kernopt.kernels.int4_ldmma import int4_ldmma, ldmma_tile
from kernopt.tolerance import mismatch, rms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from bench_gemm_int4 import make_weights  # noqa: E402  (the suite's operands: N-contiguous words)

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096)]
FORMS = {"full": 0, "no_unpack": 1, "loads": 2}
# the weights' two formats: "strip" kernopt's N-contiguous words (a program reads 128 bytes of each word row, rows
# 4 N bytes apart), "tiled" ldmma_tile's (a program's words one contiguous block: does DRAM locality move the loads?)
LAYOUTS = ("strip", "tiled")
# the sweeps' best ldmma config per shape at M <= 8 (sweeps/ldmma3-4), and 4 / 8 / 16 warps around it; and two
# chunks ahead (AHEAD 2: its 150 registers leave three 4-warp programs per SM in the full kernel, two waves at
# N = 14336, but the loads-only form fits: does more in flight per warp make the loads themselves faster?)
CONFIGS = [{"impl": "ldmma", "BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": w} for w in (4, 8, 16)] + \
    [{"impl": "ldmma", "BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 128, "AHEAD": 2, "num_warps": 4}]
# the words by TMA into a STAGES-deep shared-memory ring instead (_int4_ldmma_ring_kernel)
RING = [{"impl": "ldmma", "BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 128, "STAGES": s, "num_warps": w}
        for w, s in ((4, 3), (4, 4), (4, 6), (8, 3), (8, 4), (16, 3))] + \
    [{"impl": "ldmma", "BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 128, "STAGES": s, "ROWS": 1, "num_warps": w}
     for w, s in ((4, 4), (8, 3), (16, 3))] + \
    [{"impl": "ldmma", "BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 128, "STAGES": s, "ROWS": 1, "SPS": 2, "num_warps": w}
     for w, s in ((4, 3), (4, 4), (8, 3))]  # (ROWS: no bank conflicts; SPS 2: a barrier per two steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/sweeps/ldmma_ablate")
    ap.add_argument("--ms", default="1")
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--forms", default="full,loads", help=f"comma-separated, of {list(FORMS)}")
    ap.add_argument("--configs", default="regs,ring", help="regs (plain loads) and / or ring (the TMA ring)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,...")
    args = ap.parse_args()
    require_cuda("ldmma_ablate.py")
    g = 128
    suite = Suite("ldmma_ablate")
    torch.manual_seed(0)
    configs = (CONFIGS if "regs" in args.configs else []) + (RING if "ring" in args.configs else [])
    for K, N in [tuple(int(v) for v in kn.split("x")) for kn in args.shapes.split(",")]:
        for symmetric in (False, True):
            qweight, scales, zeros = make_weights(N, K, g, "cuda", symmetric)
            w_bf16 = dequantize_int4(qweight, scales, zeros, g, torch.bfloat16)  # the plain-torch reference
            copies, calls = rotation(qweight.numel() * 4 + scales.numel() * 4)
            qs = [(qweight, scales, zeros)] + [(qweight.clone(memory_format=torch.preserve_format),
                                                scales.clone(memory_format=torch.preserve_format),
                                                None if zeros is None else
                                                zeros.clone(memory_format=torch.preserve_format))
                                               for _ in range(copies - 1)]
            qs = {"strip": qs, "tiled": [(ldmma_tile(qw), s, z) for qw, s, z in qs] if "tiled" in args.layouts else []}
            for M in [int(m) for m in args.ms.split(",")]:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                expected = F.linear(x.double(), w_bf16.double())
                results, extra = {}, {}
                for cfg in configs:
                    for layout in args.layouts.split(","):
                        name = f"w{cfg['num_warps']}" + (f"_ahead{cfg['AHEAD']}" if cfg.get("AHEAD", 1) > 1 else "")
                        name += f"_ring{cfg['STAGES']}" if cfg.get("STAGES") else ""
                        name += "_rows" if cfg.get("ROWS") else ""
                        name += "_sps2" if cfg.get("SPS", 1) == 2 else ""
                        name += "" if layout == "strip" else f"_{layout}"
                        out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                        if layout == "strip":
                            int4_gemm(x, qweight, scales, zeros, g, config=cfg, out=out)
                        else:  # (int4_gemm takes the N-contiguous format only)
                            int4_ldmma(x, qs[layout][0][0], scales, zeros, None, out, g, cfg)
                        extra[f"{name}_check"] = mismatch(out, expected, torch.bfloat16, scale=2.0,
                                                          magnitude=rms(expected))
                        for form in args.forms.split(","):
                            outs = [torch.empty(M, N, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]

                            def make(i, cfg=cfg, ablate=FORMS[form], outs=outs, layout=layout):
                                qw, s, z = qs[layout][i]
                                return lambda: int4_ldmma(x, qw, s, z, None, outs[i], g, cfg, _ablate=ablate)
                            results[f"{name}_{form}"] = 1e3 * time_graph_ms(make, copies, calls, args.rep)
                bcopies, bcalls = rotation(w_bf16.numel() * 2)
                ws = [w_bf16] + [w_bf16.clone() for _ in range(bcopies - 1)]
                results["bf16_cublas"] = 1e3 * time_graph_ms(lambda i: (lambda: F.linear(x, ws[i])), bcopies, bcalls,
                                                             args.rep)
                case = f"M={M} K={K} N={N} g{g}{' sym' if symmetric else ''}"
                suite.add(case, "µs", False, results, **extra)
                print(case + ": " + " ".join(f"{k}={v:.2f}" for k, v in results.items()) +
                      "".join(f" {k}: {v}" for k, v in extra.items() if v))
    print(suite.table())
    print(f"wrote {suite.write(args.out)}")


if __name__ == "__main__":
    main()
