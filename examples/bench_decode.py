"""Benchmark suite "decode": kernopt's split-KV decode attention against SDPA on a contiguous cache.

    python examples/bench_decode.py            # the four cases of shared/BENCHMARKS.md + a config sweep
    python examples/bench_decode.py --quick    # one case, selected configs only (smoke run)
    python examples/bench_decode.py --out DIR  # where the JSON goes (default benchmarks/results)
    python examples/bench_decode.py --case 1x8192 --merge fused   # one case, sweep only the fused-merge configs
    bash benchmarks/run_gpu.sh decode:--case,1x8192,--no-sweep    # the same through run_gpu.sh (commas -> spaces)

Each case (bf16, Hq32 Hkv8 D128, one query token per sequence, every sequence S tokens long) runs on the same
random inputs:
- ``kernopt``: `paged_decode_attention` on a paged cache (64-token pages, pages of all sequences shuffled in
  the pool, as after many allocations and frees);
- ``kernopt_contiguous``: `decode_attention` on the contiguous cache;
- ``sdpa_gqa``: ``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)`` on the contiguous cache;
- ``kernopt_contiguous_pdl``: ``kernopt_contiguous``'s config with programmatic dependent launch (KERNOPT_PDL=1,
  kernels/pdl.py: the merge kernel launched while the split kernel drains, and each call's split kernel while the
  call before finishes), where the config splits; an experiment, off by default.
Metric: TB/s of K+V bytes read (2 * B * Hkv * S * D * 2 bytes / time per call). Every kernopt output is checked
against the fp32 reference in the same run before it is timed. kernopt's numbers use `select_config` (what a
user gets: ``paged=True`` for the paged kernel); the sweep (`candidate_configs`) records each system's best
config and its TB/s beside them (``*_best_config``, ``*_best_tbps``) so the table can be corrected from them.
The config strings end in ``merge=kernel`` (split partials merged by a second kernel) or ``merge=fused`` (the
split that finishes last merges: one kernel; `candidate_configs` lists both for every split config), and
``*_best_by_merge`` keeps the best TB/s and config of each. Even without a sweep (``--quick``, ``--no-sweep``) the
fused variant of each selected split config is timed too (``*_fused_tbps``), since the table doesn't pick it yet.

Timing (every system the same way, ``"timing": "cuda-graph replay"`` in each row): after a warm-up, N calls
of the op are captured into one CUDA graph, cycling through enough copies of the inputs (K/V pool, table, q)
that K/V can't stay in the 50 MB L2; the replay is timed with do_bench (median) and divided by N. This leaves
out the Python launch cost, which is how decode runs in a compiled model with CUDA graphs; at B1 a Triton
launch from Python (two here: split + merge) costs more host time than the ~12 us that 33.5 MB of K+V take at
3 TB/s, so do_bench on the eager call measures the host. The eager do_bench times are kept beside
(``eager_us``, the method of the earlier results).

The memory-waste row compares the paged cache's reserved-but-unused fraction with a contiguous static cache's,
on a batch with lengths spread from 64 to 4096.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from kernopt.benchmark import Suite, env_vars, require_cuda, rotation, time_graph_ms, time_ms
from kernopt.tolerance import mismatch

HQ, HKV, D = 32, 8, 128
PAGE_SIZE = 64
CASES = [(1, 8192), (32, 4096), (128, 2048), (8, 32768)]  # (B, S)
QUICK_CASES = [(1, 8192)]


def case_name(B, S):
    return f"B{B} S{S} Hq{HQ} Hkv{HKV} D{D} bf16"


def kv_bytes(B, S):
    return 2 * B * HKV * S * D * 2


def check(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    return mismatch(out, ref, torch.bfloat16)


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


def merge_kind(cfg: dict) -> str:
    """How a split config merges its partials: "fused" (single pass, last split merges) or "kernel"."""
    return "fused" if cfg.get("FUSED_MERGE") else "kernel"


def checked(fn, out, ref):
    """Run fn once into a NaN-poisoned `out` and compare with the reference: None if right, else the problem."""
    out.fill_(float("nan"))
    fn()
    torch.cuda.synchronize()
    return check(out, ref)


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
    ap.add_argument("--rep", type=int, default=50, help="do_bench repetition time in ms per timed graph")
    ap.add_argument("--no-sweep", action="store_true", help="time only select_config's config (and its fused merge)")
    ap.add_argument("--case", action="append", default=None, metavar="BxS",
                    help="only this batch x length case, e.g. 1x8192; repeatable (default: the four suite cases)")
    ap.add_argument("--merge", choices=("both", "fused", "kernel"), default="both",
                    help="which merge variants the sweep times (the selected config is always timed)")
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args(argv)
    require_cuda("bench_decode.py")

    from kernopt.kernels.decode_attention import (candidate_configs, config_string, decode_attention, fused,
                                                  paged_decode_attention, select_config)

    cases = QUICK_CASES if args.quick else CASES
    if args.case:
        cases = [tuple(int(x) for x in c.replace(",", "x").split("x")) for c in args.case]

    suite = Suite("decode")
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)
    for (B, S) in cases:
        name = case_name(B, S)
        copies, calls = rotation(kv_bytes(B, S))
        inputs = []
        for _ in range(copies):
            q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16)
            k_pages, v_pages, table = paged_copy(k, v, PAGE_SIZE)
            inputs.append(dict(q=q, k=k, v=v, k_pages=k_pages, v_pages=v_pages, table=table,
                               seq_lens=torch.full((B,), S, dtype=torch.int32, device="cuda"),
                               out=torch.empty_like(q)))
        x0 = inputs[0]
        ref = reference(x0["q"], x0["k"], x0["v"])
        tb = kv_bytes(B, S) / 1e12
        results, extra, errors, eager_us = {}, {}, [], {}

        def graph_tbps(make, rep=args.rep):
            return tb / (time_graph_ms(make, copies, calls, rep) / 1e3)

        sdpa = lambda i: (lambda: F.scaled_dot_product_attention(  # noqa: E731
            inputs[i]["q"], inputs[i]["k"], inputs[i]["v"], enable_gqa=True))
        problem = check(sdpa(0)(), ref)
        if problem:
            extra["sdpa_note"] = f"sdpa output off the reference: {problem}"
        results["sdpa_gqa"] = graph_tbps(sdpa)
        eager_us["sdpa_gqa"] = round(1e3 * time_ms(sdpa(0), rep=args.rep), 2)

        def paged(cfg):
            return lambda i: (lambda x=inputs[i]: paged_decode_attention(
                x["q"], x["k_pages"], x["v_pages"], x["table"], x["seq_lens"], config=cfg, out=x["out"]))

        def contiguous(cfg):
            return lambda i: (lambda x=inputs[i]: decode_attention(x["q"], x["k"], x["v"], config=cfg, out=x["out"]))

        paged_cfg, contiguous_cfg = select_config(B, HKV, HQ, S, D, sm, paged=True), select_config(B, HKV, HQ, S, D, sm)
        extra["kernopt_contiguous_config"] = config_string(contiguous_cfg)
        systems = {"kernopt": (paged, paged_cfg, True), "kernopt_contiguous": (contiguous, contiguous_cfg, False)}
        for sys_name, (make, chosen, is_paged) in systems.items():
            best_tbps, best_cfg = 0.0, None
            try:
                problem = checked(make(chosen)(0), x0["out"], ref)
                if problem is None:
                    results[sys_name] = best_tbps = graph_tbps(make(chosen))
                    best_cfg = chosen
                    eager_us[sys_name] = round(1e3 * time_ms(make(chosen)(0), rep=args.rep), 2)
            except Exception as e:  # a failing launch is a result of this run, not a crash of the suite
                problem = f"{type(e).__name__}: {e}"[:300]
            if problem:
                errors.append(f"{sys_name}: {problem}")
            by_merge = {}  # "fused" / "kernel" -> (TB/s, config): each merge variant's best
            if best_cfg is not None and chosen["SPLITS"] > 1:
                by_merge[merge_kind(chosen)] = (best_tbps, chosen)
            # The fused merge of the selected config, always: unmeasured, so the table doesn't pick it yet.
            if chosen["SPLITS"] > 1 and not chosen.get("FUSED_MERGE"):
                cfg = fused(chosen)
                try:
                    problem = checked(make(cfg)(0), x0["out"], ref)
                    if problem is None:
                        t = graph_tbps(make(cfg))
                        extra[f"{sys_name}_fused_tbps"] = round(t, 4)
                        by_merge["fused"] = (t, cfg)
                        if t > best_tbps:
                            best_tbps, best_cfg = t, cfg
                except Exception as e:
                    problem = f"{type(e).__name__}: {e}"[:300]
                if problem:
                    errors.append(f"{sys_name} fused merge: {problem}")
            sweep = [] if (args.quick or args.no_sweep) else candidate_configs(B, HKV, HQ, S, D, sm, paged=is_paged)
            if args.merge != "both":
                sweep = [c for c in sweep if c["SPLITS"] > 1 and merge_kind(c) == args.merge]
            for cfg in sweep:
                if cfg == chosen or cfg == fused(chosen):
                    continue  # already timed above
                try:
                    if checked(make(cfg)(0), x0["out"], ref) is not None:
                        continue
                    t = graph_tbps(make(cfg), rep=max(10, args.rep // 3))
                except Exception:  # e.g. out of shared memory for a tile/stage combination
                    continue
                if cfg["SPLITS"] > 1 and t > by_merge.get(merge_kind(cfg), (0.0, None))[0]:
                    by_merge[merge_kind(cfg)] = (t, cfg)
                if t > best_tbps:
                    best_tbps, best_cfg = t, cfg
            if sweep and best_cfg is not None:
                extra[f"{sys_name}_best_config"] = config_string(best_cfg)  # ends in merge=fused|kernel
                extra[f"{sys_name}_best_tbps"] = round(best_tbps, 4)
            if by_merge:
                extra[f"{sys_name}_best_by_merge"] = {k_: {"tbps": round(t_, 4), "config": config_string(c_)}
                                                      for k_, (t_, c_) in sorted(by_merge.items())}
        if contiguous_cfg["SPLITS"] > 1 and "kernopt_contiguous" in results:
            try:
                with env_vars(KERNOPT_PDL="1"):  # read when the graph is captured; replays need nothing
                    problem = checked(contiguous(contiguous_cfg)(0), x0["out"], ref)
                    if problem is None:
                        results["kernopt_contiguous_pdl"] = graph_tbps(contiguous(contiguous_cfg))
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"[:300]
            if problem:
                errors.append(f"kernopt_contiguous_pdl: {problem}")
        extra["time_us"] = {s_: round(kv_bytes(B, S) / (r * 1e12) * 1e6, 2) for s_, r in results.items()}
        extra["eager_us"] = eager_us  # do_bench of one eager call: Python launch included (the old method)
        extra["graph"] = {"copies": copies, "calls": calls}
        row = suite.add(name, "TB/s", True, results, config=config_string(paged_cfg),
                        error="; ".join(errors) if errors else None, timing="cuda-graph replay", **extra)
        print(name, {k_: round(v_, 3) for k_, v_ in row["results"].items()}, row.get("error", ""), flush=True)
        inputs = x0 = None  # frees the copies (the closures above hold the name, not the list)
        torch.cuda.empty_cache()

    memory_waste_row(suite)
    print(suite.table())
    path = suite.write(args.out, plot=args.plot)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
