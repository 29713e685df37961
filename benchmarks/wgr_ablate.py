"""Where the wgr int4 kernel's time goes: the table's stream-K config timed whole and with parts of its step left out.

    python benchmarks/wgr_ablate.py [--out DIR] [--ms 4,16]   (GPU; writes DIR/wgr_ablate-<gpu>.json)

Per (M, K, N) the table's wgr config (int4_gemm._wgr_pick, weights with zero points, group 128) is timed as the
gemm_int4 suite times it (CUDA-graph replay, inputs rotated past the L2) in three forms (kernels/int4_wgmma.py
`_step_mma`, ABLATE):
  full     the kernel as int4_gemm runs it
  no_unpack  the word bits go to the wgmma as they are (no shift / LOP3 / subtraction: 250 instead of 482 SASS
           instructions on the step path at 8 rows x 128 columns, offline sm_90a)
  ring     neither unpack nor wgmma (a row sum of the words): the TMA ring, x^T relabelling, barriers, scales and
           the stream-K flush only
  *_no_flush  without the stream-K flush (no partial sums stored, no arrival counters, no output)
  *_no_x   without x^T's relabelled copy into the wgmma's shared operand (the wgmma reads stale x^T)
  flush_store_only  the flush stores each program's partial sum and stops (no fence, arrival atomic or sum)
  flush_no_sum      the flush stores, arrives and re-arms, but the last program neither sums nor writes
  no_sub   the unpack makes (B + q) and subtracts nothing (the shift and LOP3 only), *_no_flush as above
  sym      the full kernel on the same words without zero points (one subtraction a pair instead of two)
  x_dot    the full kernel with the config key X_DOT (x in the dot's order, one copy per call, timed), checked;
           x_dot_more the same with one more program per SM; x_dot_copy the copy alone
  words_only  the ring carries the words only: no TMA of x, scales or zeros per step (the slot's stale ones are
           used), *_no_x / *_no_flush as above; sym_words_only the same without zero points
plus bf16 cuBLAS on the same shape. The ablated outputs are wrong by design and are not checked; the full kernel's is
(against int4_gemm_ref in float64). METHOD.md: time what you leave out; the differences say what bounds the step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kernopt.benchmark import Suite, require_cuda, rotation, time_graph_ms
from kernopt.kernels.int4_gemm import _wgr_pick, int4_gemm, int4_gemm_ref
from kernopt.kernels.int4_wgmma import int4_wgr_gemm, wgr_x_dot
from kernopt.tolerance import mismatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from bench_gemm_int4 import make_weights  # noqa: E402  (the suite's operands: N-contiguous words, zero points)

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096)]
FORMS = {"full": 0, "no_unpack": 1, "ring": 3, "full_no_flush": 4, "full_no_x": 8, "ring_no_flush": 7,
         "ring_no_x": 11, "ring_no_x_no_flush": 15, "flush_store_only": 16, "flush_no_sum": 32, "no_sub": 64,
         "no_sub_no_flush": 68, "words_only": 128, "words_only_no_x": 136, "words_only_no_flush": 132}
# the table's config with other keys (kernels/int4_wgmma.py): X_DOT, x permuted once per call (its copy timed too)
CFG_FORMS = {"x_dot": lambda c: {"X_DOT": 1},
             "x_dot_more": lambda c: {"X_DOT": 1, "CTAS_PER_SM": int(c.get("CTAS_PER_SM", 3)) + 1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/sweeps/wgr_ablate")
    ap.add_argument("--ms", default="4,16")
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--forms", default=None, help="comma-separated subset of the forms (default: all)")
    args = ap.parse_args()
    require_cuda("wgr_ablate.py")
    g, rows = 128, []
    for M in [int(m) for m in args.ms.split(",")]:
        for K, N in SHAPES:
            cfg = _wgr_pick(M, N, K, g)
            if cfg is None or not cfg.get("STREAM"):
                print(f"M={M} K={K} N={N}: the table's pick is not the stream-K wgr ({cfg}); skipped")
                continue
            copies, calls = rotation(N * K // 2 + N * (K // g) * 4)
            ops = []
            for _ in range(copies):
                qw, s, z = make_weights(N, K, g, "cuda")
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                ops.append((x, qw, s, z, torch.empty(M, N, device="cuda", dtype=torch.bfloat16)))

            def check(c):  # the kernel as int4_gemm runs it with config c, NaN-poisoned out, float64 reference
                x, qw, s, z, out = ops[0]
                out.fill_(float("nan"))
                int4_gemm(x, qw, s, z, g, config=c, out=out)
                return mismatch(out, int4_gemm_ref(x.double(), qw, s, z, g), torch.bfloat16, scale=2.0) or "ok"

            def timed(c, zeros=True, ab=0):  # us of int4_wgr_gemm with config c over the rotated operands
                def make(i):
                    x, qw, s, z, out = ops[i]
                    return lambda: int4_wgr_gemm(x, qw, s, z, z, out, M, N, K, g, 1, K, zeros, False, c, None,
                                                 _ablate=ab)
                return round(1e3 * time_graph_ms(make, copies, calls, args.rep), 3)

            row = {"M": M, "K": K, "N": N, "config": cfg, "check": check(cfg), "us": {}}
            forms = FORMS if args.forms is None else {f: FORMS[f] for f in args.forms.split(",") if f in FORMS}
            for name, ab in forms.items():
                row["us"][name] = timed(cfg, ab=ab)
            for name, over in CFG_FORMS.items():  # whole kernels with other config keys: checked, then timed
                ocfg = {**cfg, **over(cfg)}
                row[f"check_{name}"] = check(ocfg)
                row["us"][name] = timed(ocfg)
            row["us"]["x_dot_copy"] = round(1e3 * time_graph_ms(
                lambda i: (lambda: wgr_x_dot(ops[i][0])), copies, calls, args.rep), 3)
            row["us"]["sym"] = timed(cfg, zeros=False)
            row["us"]["sym_words_only"] = timed(cfg, zeros=False, ab=128)
            w = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(min(copies, 3))]
            row["us"]["bf16_cublas"] = round(1e3 * time_graph_ms(
                lambda i: (lambda: F.linear(ops[i][0], w[i % len(w)])), copies, calls, args.rep), 3)
            row["gb"] = round((N * K // 2 + 2 * N * (K // g) * 2) / 1e9, 4)
            print(f"M={M} K={K} N={N}: " + "  ".join(f"{k} {v:.2f} us" for k, v in row["us"].items())
                  + "  (checks: " + ", ".join(f"{k} {v}" for k, v in row.items() if k.startswith("check")) + ")")
            rows.append(row)
    suite = Suite("wgr_ablate")  # the suites' JSON header (device, versions, commit, date)
    suite.header["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    suite.rows = rows
    print("wrote", suite.write(Path(args.out)))


if __name__ == "__main__":
    main()
