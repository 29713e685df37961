"""Prefill attention with a caller's mask: flash_attention's bounded mask loops (BOUNDS) against the unbounded ones.

The masks are what transformers hands attention for a prompt it cannot mark causal:
- ``static_cache``: a prompt of Sq tokens into a static cache of Skv > Sq slots (generate with
  cache_implementation="static"): key j visible to query i iff j <= i, the unfilled slots hidden;
- ``causal``: the same square (Sq == Skv), what a compiled forward builds when the constant fold cannot apply
  (the mask depends on an input, e.g. cache_position);
- ``left_pad``: ``static_cache`` with the first 256 keys hidden too (a left-padded sequence).

Systems, each timed as CUDA-graph replay (kernopt.benchmark.time_graph_ms, inputs rotated past the L2):
``bounds`` / ``nobounds`` (KERNOPT_MASK_BOUNDS=0): kernopt.kernels.flash_attention with the bool mask;
``causal_flag``: the kernel with causal=True and no mask on the first Sq keys (the fold's best case);
``sdpa_mask``: F.scaled_dot_product_attention with the same mask (what HF static + Inductor calls);
``sdpa_causal``: SDPA with is_causal=True on the first Sq keys.

    python benchmarks/mask_probe.py [--out DIR]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kernopt.benchmark import Suite, env_vars, require_cuda, rotation, time_graph_ms

SHAPES = [(32, 8, 128), (32, 8, 64)]  # (Hq, Hkv, D): Llama 8B, Llama 1B
SQ, SKV = 2048, 2048 + 128


def masks(sq: int, skv: int) -> dict[str, torch.Tensor]:
    i = torch.arange(sq, device="cuda")[:, None]
    j = torch.arange(skv, device="cuda")[None, :]
    static = (j <= i)[None, None]
    pad = static & (j >= 256)[None, None]
    causal = (j[:, :sq] <= i)[None, None]
    return {"static_cache": static, "left_pad": pad, "causal": causal}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    ap.add_argument("--rep", type=int, default=30, help="do_bench ms per timed graph")
    args = ap.parse_args(argv)
    require_cuda("mask_probe.py")
    from kernopt.kernels.flash_attention import flash_attention

    suite = Suite("mask_probe")
    torch.manual_seed(0)
    dtype = torch.bfloat16
    for hq, hkv, d in SHAPES:
        for name, mask in masks(SQ, SKV).items():
            skv = mask.shape[-1]
            nbytes = 2 * hkv * skv * d * 2 + SQ * hq * d * 4 + mask.numel()
            copies, calls = rotation(nbytes)
            calls = min(calls, 4 * copies)
            xs = [dict(q=torch.randn(1, SQ, hq, d, device="cuda", dtype=dtype).transpose(1, 2),
                       k=torch.randn(1, skv, hkv, d, device="cuda", dtype=dtype).transpose(1, 2),
                       v=torch.randn(1, skv, hkv, d, device="cuda", dtype=dtype).transpose(1, 2),
                       m=mask.clone()) for _ in range(copies)]

            def kern(i):
                x = xs[i]
                return lambda: flash_attention(x["q"], x["k"], x["v"], mask=x["m"])

            def kern_causal(i):
                x = xs[i]
                return lambda: flash_attention(x["q"], x["k"][:, :, :SQ], x["v"][:, :, :SQ], causal=True)

            def sdpa(i):
                x = xs[i]
                return lambda: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=x["m"],
                                                              enable_gqa=True)

            def sdpa_causal(i):
                x = xs[i]
                return lambda: F.scaled_dot_product_attention(x["q"], x["k"][:, :, :SQ], x["v"][:, :, :SQ],
                                                              is_causal=True, enable_gqa=True)

            x = xs[0]
            want = F.scaled_dot_product_attention(x["q"].float(), x["k"].float(), x["v"].float(),
                                                  attn_mask=x["m"], enable_gqa=True)
            want = torch.nan_to_num(want, nan=0.0)  # SDPA's rows that see no key are NaN, the kernel's 0
            err = {}
            res = {}
            for system, env in (("bounds", "1"), ("nobounds", "0")):
                with env_vars(KERNOPT_MASK_BOUNDS=env):
                    got = kern(0)().float()
                    err[system] = float((got - want).abs().max())
                    res[system] = 1e3 * time_graph_ms(kern, copies, calls, args.rep)
            res["causal_flag"] = 1e3 * time_graph_ms(kern_causal, copies, calls, args.rep)
            res["sdpa_mask"] = 1e3 * time_graph_ms(sdpa, copies, calls, args.rep)
            res["sdpa_causal"] = 1e3 * time_graph_ms(sdpa_causal, copies, calls, args.rep)
            row = suite.add(f"B1 Hq{hq} Hkv{hkv} Sq{SQ} Skv{skv} D{d} {name} bf16", "us", False, res,
                            max_abs_err_vs_fp32_sdpa=err)
            print(row["case"], {k: round(v, 2) for k, v in res.items()}, err, flush=True)
            xs = None
            torch.cuda.empty_cache()
    print(suite.table())
    print(f"wrote {suite.write(args.out)}")


if __name__ == "__main__":
    main()
