"""Benchmark suite "decode": kernopt's split-KV decode attention against SDPA on a contiguous cache.

    python examples/bench_decode.py            # the four cases of shared/BENCHMARKS.md + a config sweep
    python examples/bench_decode.py --quick    # one case, selected configs only (smoke run)
    python examples/bench_decode.py --out DIR  # where the JSON goes (default benchmarks/results)

Each case (bf16, Hq32 Hkv8 D128, one query token per sequence, every sequence S tokens long) runs on the same
random inputs:
- ``kernopt``: `paged_decode_attention` on a paged cache (64-token pages, pages of all sequences shuffled in
  the pool, as after many allocations and frees);
- ``kernopt_contiguous``: `decode_attention` on the contiguous cache;
- ``sdpa_gqa``: ``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)`` on the contiguous cache.
Metric: TB/s of K+V bytes read (2 * B * Hkv * S * D * 2 bytes / median time). Every kernopt output is checked
against the fp32 reference in the same run before it is timed. kernopt's numbers use `select_config` (what a
user gets); the sweep's best config and its TB/s are recorded beside them (``best_config``, ``best_tbps``) so
the table can be corrected from them. The memory-waste row compares the paged cache's reserved-but-unused
fraction with a contiguous static cache's, on a batch with lengths spread from 64 to 4096.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from kernopt.benchmark import Suite, require_cuda, time_ms
from kernopt.tolerance import tolerance

HQ, HKV, D = 32, 8, 128
PAGE_SIZE = 64
CASES = [(1, 8192), (32, 4096), (128, 2048), (8, 32768)]  # (B, S)
QUICK_CASES = [(1, 8192)]


def case_name(B, S):
    return f"B{B} S{S} Hq{HQ} Hkv{HKV} D{D} bf16"


def kv_bytes(B, S):
    return 2 * B * HKV * S * D * 2


def check(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    rtol, atol = tolerance(torch.bfloat16)
    o, r = out.float(), ref.float()
    if torch.isnan(o).any():
        return f"{int(torch.isnan(o).sum())} NaN values"
    err = (o - r).abs()
    over = err > atol + rtol * r.abs()
    if over.any():
        return f"{int(over.sum())}/{o.numel()} elements beyond rtol={rtol} atol={atol}; max abs err {err.max().item():.3g}"
    return None


def reference(q, k, v):
    from kernopt.kernels.decode_attention import decode_attention_ref

    return torch.cat([decode_attention_ref(q[i:i + 1].float(), k[i:i + 1].float(), v[i:i + 1].float())
                      for i in range(q.shape[0])]).to(q.dtype)


def paged_copy(k, v, page_size):
    """The contiguous cache scattered into a pool of shuffled pages + its block table."""
    B, hkv, S, d = k.shape
    per_seq = math.ceil(S / page_size)
    num_pages = B * per_seq
    perm = torch.randperm(num_pages, device=k.device)
    table = perm.view(B, per_seq).to(torch.int32)
    k_pages = torch.empty((num_pages, page_size, hkv, d), dtype=k.dtype, device=k.device)
    v_pages = torch.empty_like(k_pages)
    pad = per_seq * page_size - S
    for src, dst in ((k, k_pages), (v, v_pages)):
        x = F.pad(src, (0, 0, 0, pad)).view(B, hkv, per_seq, page_size, d).permute(0, 2, 3, 1, 4)
        dst[table.long().flatten()] = x.reshape(num_pages, page_size, hkv, d)
    return k_pages, v_pages, table


def sweep_configs(B, S):
    from kernopt.kernels.decode_attention import select_config

    base = select_config(B, HKV, HQ, S, D, torch.cuda.get_device_properties(0).multi_processor_count)
    out = []
    for block_n in (32, 64, 128):
        for stages in (2, 3, 4):
            for warps in (4, 8):
                for mult in (0.5, 1, 2):
                    splits = max(1, min(256, int(round(base["SPLITS"] * mult))))
                    cfg = {**base, "BLOCK_N": block_n, "num_stages": stages, "num_warps": warps, "SPLITS": splits}
                    if cfg not in out:
                        out.append(cfg)
    return out


def time_kernel(fn, out, ref, rep):
    out.fill_(float("nan"))
    fn()
    torch.cuda.synchronize()
    problem = check(out, ref)
    if problem:
        return None, problem
    return time_ms(fn, rep=rep), None


def memory_waste_row(suite: Suite):
    from kernopt.paged_cache import PagedKVCache, static_cache_waste

    lengths = torch.linspace(64, 4096, 32).round().long().tolist()
    cache = PagedKVCache(num_layers=1, page_size=PAGE_SIZE)
    width = max(lengths)
    k = torch.zeros(len(lengths), HKV, width, D, dtype=torch.bfloat16, device="cuda")
    valid = (torch.arange(width)[None, :] >= (width - torch.tensor(lengths))[:, None]).cuda()
    cache.append(0, k, k, valid)
    paged = cache.memory_waste()
    static = static_cache_waste(lengths, width)
    rep = cache.memory_report()
    print(f"memory waste, B{len(lengths)} lengths 64..4096: paged (page {PAGE_SIZE}) {100 * paged:.2f}% "
          f"reserved-but-unused; contiguous static cache (max_len {width}) {100 * static:.2f}%; "
          f"pool-level {100 * rep['pool_waste']:.2f}%")
    suite.add(f"memory waste B{len(lengths)} lengths 64..4096 page{PAGE_SIZE}", "reserved-unused %", False,
              {"kernopt": 100 * paged, "static_cache": 100 * static},
              pool_waste_pct=round(100 * rep["pool_waste"], 3))
    del cache, k


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one case, selected configs only")
    ap.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    ap.add_argument("--rep", type=int, default=50, help="do_bench repetition time in ms")
    ap.add_argument("--no-sweep", action="store_true", help="time only select_config's config")
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args(argv)
    require_cuda("bench_decode.py")

    from kernopt.kernels.decode_attention import (config_string, decode_attention, paged_decode_attention,
                                                  select_config)

    suite = Suite("decode")
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)
    for (B, S) in (QUICK_CASES if args.quick else CASES):
        name = case_name(B, S)
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16)
        k_pages, v_pages, table = paged_copy(k, v, PAGE_SIZE)
        seq_lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
        ref = reference(q, k, v)
        tb = kv_bytes(B, S) / 1e12
        results, extra, errors = {}, {}, []

        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        problem = check(sdpa(), ref)
        results["sdpa_gqa"] = tb / (time_ms(sdpa, rep=args.rep) / 1e3)
        if problem:
            extra["sdpa_note"] = f"sdpa output off the reference: {problem}"

        out = torch.empty_like(q)
        chosen = select_config(B, HKV, HQ, S, D, sm)
        systems = {
            "kernopt": lambda cfg: (lambda: paged_decode_attention(q, k_pages, v_pages, table, seq_lens,
                                                                   config=cfg, out=out)),
            "kernopt_contiguous": lambda cfg: (lambda: decode_attention(q, k, v, config=cfg, out=out)),
        }
        sweep = [] if (args.quick or args.no_sweep) else sweep_configs(B, S)
        for sys_name, make in systems.items():
            ms, problem = time_kernel(make(chosen), out, ref, args.rep)
            if problem:
                errors.append(f"{sys_name}: {problem}")
            else:
                results[sys_name] = tb / (ms / 1e3)
            best_ms, best_cfg = (ms, chosen) if ms is not None else (float("inf"), None)
            for cfg in sweep:
                try:
                    t, bad = time_kernel(make(cfg), out, ref, max(10, args.rep // 2))
                except Exception as e:  # e.g. out of shared memory for a tile/stage combination
                    t, bad = None, f"{type(e).__name__}"
                if t is not None and t < best_ms:
                    best_ms, best_cfg = t, cfg
            if sweep and best_cfg is not None:
                extra[f"{sys_name}_best_config"] = config_string(best_cfg)
                extra[f"{sys_name}_best_tbps"] = round(tb / (best_ms / 1e3), 4)
        extra["time_us"] = {s: round(kv_bytes(B, S) / (r * 1e12) * 1e6, 2) for s, r in results.items()}
        row = suite.add(name, "TB/s", True, results, config=config_string(chosen),
                        error="; ".join(errors) if errors else None, **extra)
        print(name, {k_: round(v_, 3) for k_, v_ in row["results"].items()}, row.get("error", ""))
        del k_pages, v_pages, k, v
        torch.cuda.empty_cache()

    memory_waste_row(suite)
    print(suite.table())
    path = suite.write(args.out, plot=args.plot)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
