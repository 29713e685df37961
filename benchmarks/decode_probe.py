"""Decode attention at B1: where the time of a call goes, against what reading the same bytes costs (#4).

    python benchmarks/decode_probe.py [--out DIR]      # JSON: DIR/decode_probe-<gpu>.json
    ncu --clock-control none --kernel-name regex:_attend_split --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        python benchmarks/decode_probe.py --launch 8192   # a few eager calls, a target for Nsight Compute

Every number is microseconds per call from one CUDA graph of many calls, inputs rotated past the L2 (as
examples/bench_decode.py times); B1 Hq32 Hkv8 D128 bf16, contiguous cache:
- ``length S<n>``: select_config's pick: the whole call (split + merge kernel), the split kernel alone (the merge
  launch skipped: its output is not valid, timing only), the fused merge, PDL (KERNOPT_PDL=1), and SDPA. The
  slope and intercept over S split a call into streaming and fixed cost.
- ``splits S8192``: the split kernel alone (and the whole call) at 8..128 splits, BLOCK_N 64 and 128.
- ``read S<n>``: a Triton kernel that only reads the same K+V bytes (P programs, each summing one contiguous
  chunk; ``_x4``: four independent loads a step): what reading those bytes costs at this size, for P from 132 to
  2048, and the best of them (``best``, Triton kernels only); ``torch_sum``: torch's own reduction of them.
- ``empty``: a graph of launches of a kernel that does nothing (1 and 256 programs): one kernel boundary.
"""
from __future__ import annotations

import argparse
import contextlib
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernopt.benchmark import Suite, env_vars, require_cuda, rotation, time_graph_ms

HQ, HKV, D = 32, 8, 128
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


@triton.jit
def _read_kernel(x_ptr, out_ptr, numel, chunk, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lo = pid.to(tl.int64) * chunk
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, chunk, BLOCK):
        offs = lo + i + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


@triton.jit
def _read4_kernel(x_ptr, out_ptr, numel, chunk, BLOCK: tl.constexpr):
    """_read_kernel with four independent loads per step (more bytes in flight per thread)."""
    pid = tl.program_id(0)
    lo = pid.to(tl.int64) * chunk
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, chunk, 4 * BLOCK):
        offs = lo + i + tl.arange(0, BLOCK)
        a = tl.load(x_ptr + offs, mask=offs < numel, other=0.0)
        b = tl.load(x_ptr + offs + BLOCK, mask=offs + BLOCK < numel, other=0.0)
        c = tl.load(x_ptr + offs + 2 * BLOCK, mask=offs + 2 * BLOCK < numel, other=0.0)
        d = tl.load(x_ptr + offs + 3 * BLOCK, mask=offs + 3 * BLOCK < numel, other=0.0)
        acc += (a.to(tl.float32) + b.to(tl.float32)) + (c.to(tl.float32) + d.to(tl.float32))
    tl.store(out_ptr + pid, tl.sum(acc))


@triton.jit
def _empty_kernel(out_ptr, n):
    if tl.program_id(0) >= n:  # never: the launch is the whole cost
        tl.store(out_ptr, 0.0)


class _NoLaunch:
    """Stands in for the merge kernel: `kernel[grid](...)` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def split_only():
    import kernopt.kernels.decode_attention as da

    saved = da._merge_splits_kernel
    da._merge_splits_kernel = _NoLaunch()
    try:
        yield
    finally:
        da._merge_splits_kernel = saved


def kv_bytes(S: int, B: int = 1) -> int:
    return 2 * B * HKV * S * D * 2


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    ap.add_argument("--rep", type=int, default=30, help="do_bench ms per timed graph")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--launch", type=int, default=0, metavar="S", help="only launch the selected config a few times")
    ap.add_argument("--cases", default=None, metavar="BxS,...",
                    help="the table A/B instead: per case (e.g. 32x4096) select_config's pick and tiles / stages / "
                         "warps / splits around it, contiguous and paged (64-token pages), and SDPA")
    args = ap.parse_args(argv)
    require_cuda("decode_probe.py")
    from kernopt.kernels.decode_attention import config_string, decode_attention, fused, select_config

    sm = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)

    def make_inputs(S, copies, B=1):
        return [dict(q=torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16),
                     k=torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16),
                     v=torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16),
                     out=torch.empty(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)) for _ in range(copies)]

    if args.launch:
        x = make_inputs(args.launch, 1)[0]
        cfg = select_config(1, HKV, HQ, args.launch, D, sm)
        print(config_string(cfg))
        for _ in range(6):
            decode_attention(x["q"], x["k"], x["v"], config=cfg, out=x["out"])
        torch.cuda.synchronize()
        return

    suite = Suite("decode_probe_cases" if args.cases else "decode_probe")

    def us(make, copies, calls):
        return 1e3 * time_graph_ms(make, copies, calls, args.rep)

    def call(inputs, cfg):
        return lambda i: (lambda x=inputs[i]: decode_attention(x["q"], x["k"], x["v"], config=cfg, out=x["out"]))

    if args.cases:
        for case in args.cases.split(","):
            B, S = (int(x) for x in case.lower().split("x"))
            table_ab(suite, B, S, sm, us, call, make_inputs)
        print(suite.table())
        print(f"wrote {suite.write(args.out)}")
        return

    for S in (int(s) for s in args.lengths.split(",")):
        copies, calls = rotation(kv_bytes(S))
        inputs = make_inputs(S, copies)
        cfg = select_config(1, HKV, HQ, S, D, sm)
        res = {"call": us(call(inputs, cfg), copies, calls)}
        if cfg["SPLITS"] > 1:
            with split_only():
                res["split_only"] = us(call(inputs, cfg), copies, calls)
            res["fused"] = us(call(inputs, fused(cfg)), copies, calls)
            with env_vars(KERNOPT_PDL="1"):
                res["pdl"] = us(call(inputs, cfg), copies, calls)
        res["sdpa"] = us(lambda i: (lambda x=inputs[i]: F.scaled_dot_product_attention(
            x["q"], x["k"], x["v"], enable_gqa=True)), copies, calls)
        tbps = {k: round(kv_bytes(S) / (v * 1e-6) / 1e12, 3) for k, v in res.items()}
        row = suite.add(f"length S{S}", "us", False, res, config=config_string(cfg), tbps=tbps)
        print(row["case"], row["results"], flush=True)

        if S == 8192:
            # (BLOCK_N, splits, warps, stages): the table's neighbourhood, then deeper pipelines of small tiles
            # (32-token tiles: 16 KB of K+V a stage) and 3 programs per SM (48 splits: 384 programs)
            tried = [(bn, sp, 4, 3) for bn in (64, 128) for sp in (8, 16, 32, 64, 128) if sp * bn <= S]
            tried += [(32, 32, 4, 4), (32, 32, 4, 6), (32, 32, 4, 8), (32, 64, 4, 4), (32, 64, 4, 6),
                      (32, 32, 2, 6), (64, 32, 4, 2), (64, 32, 8, 3), (64, 48, 4, 3), (64, 40, 4, 3),
                      (128, 16, 8, 2), (32, 48, 4, 5)]
            for block_n, splits, warps, stages in tried:
                c = {**cfg, "BLOCK_N": block_n, "SPLITS": splits, "num_warps": warps, "num_stages": stages}
                try:
                    r = {"call": us(call(inputs, c), copies, calls)}
                    with split_only():
                        r["split_only"] = us(call(inputs, c), copies, calls)
                except Exception as e:  # e.g. out of shared memory
                    print(f"{config_string(c)}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                row = suite.add(f"splits S{S} BLOCK_N{block_n} splits{splits} w{warps} s{stages}", "us", False, r,
                                config=config_string(c))
                print(row["case"], row["results"], flush=True)

        # Reading the same bytes: one flat buffer per copy (K and V of a copy are adjacent here).
        flat = [torch.randn(2 * HKV * S * D, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        sink = torch.empty(4096, device="cuda", dtype=torch.float32)
        numel = flat[0].numel()
        res = {}
        for programs in (132, 264, 256, 512, 1024, 2048):
            for block, warps in ((2048, 4), (4096, 8)):
                chunk = math.ceil(math.ceil(numel / programs) / block) * block
                if programs > 1 and chunk * (programs - 1) >= numel:
                    continue

                def read(i, p=programs, c=chunk, b=block, w=warps):
                    return lambda: _read_kernel[(p,)](flat[i], sink, numel, c, BLOCK=b, num_warps=w, num_stages=3)

                res[f"P{programs}_B{block}"] = us(read, copies, calls)

                def read4(i, p=programs, c=chunk, b=block // 4, w=warps):
                    return lambda: _read4_kernel[(p,)](flat[i], sink, numel, c, BLOCK=b, num_warps=w)

                res[f"P{programs}_B{block}_x4"] = us(read4, copies, calls)
        res["torch_sum"] = us(lambda i: (lambda: flat[i].sum()), copies, calls)
        res["best"] = min(v for k, v in res.items() if k != "torch_sum")
        row = suite.add(f"read S{S}", "us", False, res, tbps=round(kv_bytes(S) / (res["best"] * 1e-6) / 1e12, 3))
        print(row["case"], {k: round(v, 2) for k, v in row["results"].items()}, flush=True)
        inputs = flat = None
        torch.cuda.empty_cache()

    sink = torch.empty(1, device="cuda", dtype=torch.float32)
    res = {f"grid{g}": us(lambda i, g=g: (lambda: _empty_kernel[(g,)](sink, g)), 1, 200) for g in (1, 256)}
    suite.add("empty", "us", False, res)
    print("empty", res)
    print(suite.table())
    print(f"wrote {suite.write(args.out)}")


def table_ab(suite, B, S, sm, us, call, make_inputs) -> None:
    """--cases: one (B, S), every sequence S long. Rows ``ab B<b> S<s> <config>`` with ``contiguous`` (main's
    ``call``) and ``paged`` (us per call: select_config's pick, ``table``, then tiles / stages / warps / splits
    around it), and SDPA."""
    from kernopt.kernels.decode_attention import config_string, paged_decode_attention, select_config

    page = 64
    copies, calls = rotation(kv_bytes(S, B))
    inputs = make_inputs(S, copies, B)
    for x in inputs:  # the same K / V as a paged pool (pages in sequence order), lengths S
        x["kp"] = x["k"].permute(0, 2, 1, 3).reshape(B * S // page, page, HKV, D)
        x["vp"] = x["v"].permute(0, 2, 1, 3).reshape(B * S // page, page, HKV, D)
        x["table"] = torch.arange(B * S // page, device="cuda", dtype=torch.int32).reshape(B, S // page)
        x["lens"] = torch.full((B,), S, device="cuda", dtype=torch.int32)
    cfg = select_config(B, HKV, HQ, S, D, sm)
    tried = [cfg]
    split_opts = sorted({cfg["SPLITS"], max(1, cfg["SPLITS"] // 2), min(128, cfg["SPLITS"] * 2)})
    for block_n, stages, warps in ((64, 2, 4), (64, 3, 4), (64, 4, 4), (128, 2, 4), (128, 3, 4), (128, 3, 8)):
        for splits in split_opts:
            c = {**cfg, "BLOCK_N": block_n, "num_stages": stages, "num_warps": warps, "SPLITS": splits}
            if splits * block_n <= S and c not in tried:
                tried.append(c)
    paged_cfg = select_config(B, HKV, HQ, S, D, sm, paged=True)
    if paged_cfg not in tried:
        tried.insert(1, paged_cfg)

    def paged(c):
        return lambda i: (lambda x=inputs[i]: paged_decode_attention(x["q"], x["kp"], x["vp"], x["table"], x["lens"],
                                                                    config=c, out=x["out"]))

    for n, c in enumerate(tried + [cfg]):  # the table again last: a first-timed config can read slow
        r = {}
        for key, make in (("contiguous", lambda c: call(inputs, c)), ("paged", paged)):
            try:
                r[key] = us(make(c), copies, calls)
            except Exception as e:  # e.g. out of shared memory
                print(f"{config_string(c)} {key}: {type(e).__name__}: {str(e)[:160]}", flush=True)
        if not r:
            continue
        name = ("table again" if n == len(tried) else "table" if c is cfg else "table paged" if c is paged_cfg
                else config_string(c))
        row = suite.add(f"ab B{B} S{S} {name}", "us", False, r, config=config_string(c),
                        tbps={k: round(kv_bytes(S, B) / (v * 1e-6) / 1e12, 3) for k, v in r.items()})
        print(row["case"], {k: round(v, 2) for k, v in r.items()}, row["tbps"], flush=True)
    r = {"sdpa": us(lambda i: (lambda x=inputs[i]: F.scaled_dot_product_attention(
        x["q"], x["k"], x["v"], enable_gqa=True)), copies, calls)}
    row = suite.add(f"sdpa B{B} S{S}", "us", False, r, tbps=round(kv_bytes(S, B) / (r["sdpa"] * 1e-6) / 1e12, 3))
    print(row["case"], r, row["tbps"], flush=True)
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
