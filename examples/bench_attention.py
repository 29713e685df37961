"""Benchmark suite "attention": kernopt's FlashAttention prefill kernel against PyTorch SDPA backends.

    python examples/bench_attention.py            # all cases of shared/BENCHMARKS.md, config sweep on D128
    python examples/bench_attention.py --quick    # two cases, for a smoke run
    python examples/bench_attention.py --out DIR  # where the JSON goes (default benchmarks/results)

Each case runs kernopt and the SDPA backends (default, flash, efficient, cuDNN where available) on the
same random bf16 inputs. Every kernopt config's output is checked against the fp32 reference in the same
run before it is timed; kernopt's number is the best checked config, named in the row's "config".
TFLOP/s counts 4*B*Hq*Sq*Skv*D (halved for causal, the FlashAttention convention).

`results` are do_bench medians (host launch included, as an eager caller sees it), one system after another.
Each row also holds `graph_tflops`: CUDA-graph replay (GPU time only) of the selected config, its twin, SDPA
default and SDPA's FA2 backend, timed in 5 interleaved rounds (order rotated each round) so that a drift of the
GPU's clocks during the run falls on all of them alike; the median round, with the rounds' range in
`graph_spread_tflops`. And `host_us` (Python launch cost of one kernopt call): where `results` and `graph_tflops`
disagree for kernopt, the host was the bottleneck (the TMA launch builds three tensor descriptors per call).

    python examples/bench_attention.py --filter split   # sweep only candidates whose label has "split"
    python examples/bench_attention.py --filter persistent+minmask   # ... either of these
    python examples/bench_attention.py --only "Hkv8 S4096 D128 causal=1" --filter persistent --graph-all
                                       # the swept candidates by CUDA-graph replay as well, interleaved with SDPA
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
import torch.nn.functional as F

from kernopt.benchmark import Suite, require_cuda, time_ms
from kernopt.tolerance import tolerance

# (B, Hq, Hkv, S, D)
CASES = [
    (4, 32, 32, 2048, 128),
    (1, 32, 32, 8192, 128),
    (8, 16, 16, 1024, 64),
    (4, 32, 8, 4096, 128),
]
QUICK_CASES = [(4, 32, 32, 2048, 128)]


def case_name(B, Hq, Hkv, S, D, causal):
    heads = f"H{Hq}" if Hq == Hkv else f"Hq{Hq} Hkv{Hkv}"
    return f"B{B} {heads} S{S} D{D} causal={int(causal)} bf16"


def flops(B, Hq, S, D, causal):
    f = 4.0 * B * Hq * S * S * D
    return f / 2 if causal else f


def check(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """The kernopt.tolerance rule for bf16, evaluated on the GPU (the outputs are large)."""
    rtol, atol = tolerance(torch.bfloat16)
    o, r = out.float(), ref.float()
    if torch.isnan(o).any():
        return f"{int(torch.isnan(o).sum())} NaN values"
    err = (o - r).abs()
    over = err > atol + rtol * r.abs()
    if over.any():
        return f"{int(over.sum())}/{o.numel()} elements beyond rtol={rtol} atol={atol}; max abs err {err.max().item():.3g}"
    return None


def reference(q, k, v, causal):
    from kernopt.kernels.flash_attention import flash_attention_ref

    # one batch element at a time keeps the fp32 score matrix small enough
    return torch.cat([flash_attention_ref(q[i:i + 1].float(), k[i:i + 1].float(), v[i:i + 1].float(),
                                          causal=causal) for i in range(q.shape[0])])


def _capture(fn, calls: int):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def _replay_ms(graph, reps: int, calls: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def graph_rounds(fns: dict, rounds: int = 5, reps: int = 10, calls: int = 4) -> tuple[dict, dict]:
    """CUDA-graph replay of several systems in interleaved rounds (the order rotated every round), so that a clock
    or thermal drift during the run falls on all of them alike: ({name: median ms over the rounds},
    {name: (min, max) ms of the rounds}). A system whose capture fails is left out (its error in the second dict)."""
    graphs, errors = {}, {}
    for name, fn in fns.items():
        try:
            graphs[name] = _capture(fn, calls)
        except Exception as e:  # capture unsupported for this call
            errors[name] = f"{type(e).__name__}: {str(e)[:120]}"
    names = list(graphs)
    per = {n: [] for n in names}
    for r in range(rounds if names else 0):
        for n in names[r % len(names):] + names[:r % len(names)]:
            per[n].append(_replay_ms(graphs[n], reps, calls))
    del graphs
    med = {n: sorted(v)[len(v) // 2] for n, v in per.items()}
    spread = {n: (min(v), max(v)) for n, v in per.items()}
    return med, {**spread, **errors}


def host_us(fn, n: int = 50) -> float:
    """Mean wall-clock microseconds to enqueue one call (the GPU queue does not fill in n calls)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}
    out = {"sdpa_default": None}
    for name, attr in names.items():
        if hasattr(SDPBackend, attr):
            out[name] = getattr(SDPBackend, attr)
    return out


def sdpa_call(q, k, v, causal, backend):
    from torch.nn.attention import sdpa_kernel

    gqa = q.shape[1] != k.shape[1]

    def ctx():
        return sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()

    def fn():
        with ctx():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    try:
        fn()
        return fn, ""
    except Exception:
        if not gqa:
            raise
    # this backend has no GQA: give it K/V already repeated (outside the timed region)
    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)

    def fn_rep():
        with ctx():
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=causal)

    fn_rep()
    return fn_rep, "pre-repeated K/V"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two cases only, selected config only")
    ap.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
    ap.add_argument("--rep", type=int, default=60, help="do_bench repetition time in ms")
    ap.add_argument("--no-sweep", action="store_true", help="time only select_config's config")
    ap.add_argument("--filter", default=None,
                    help="sweep only the candidates whose label contains this, or one of several joined by +"
                         " (plus the selected config)")
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this (e.g. 'D128 causal=0')")
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--graph-all", action="store_true",
                    help="time every checked sweep candidate by CUDA-graph replay too, in the interleaved rounds")
    args = ap.parse_args(argv)
    require_cuda("bench_attention.py")

    from kernopt.kernels.flash_attention import candidate_configs, config_str, flash_attention, select_config

    suite = Suite("attention")
    backends = sdpa_backends()
    cases = QUICK_CASES if args.quick else CASES
    torch.manual_seed(0)
    for (B, Hq, Hkv, S, D) in cases:
        for causal in (False, True):
            name = case_name(B, Hq, Hkv, S, D, causal)
            if args.only and args.only not in name:
                continue
            q = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
            fl = flops(B, Hq, S, D, causal)
            ref = reference(q, k, v, causal)

            results, notes = {}, {}
            for sys_name, backend in backends.items():
                try:
                    fn, note = sdpa_call(q, k, v, causal, backend)
                    results[sys_name] = fl / time_ms(fn, rep=args.rep) / 1e9
                    if note:
                        notes[sys_name] = note
                except Exception as e:  # backend unavailable for this shape
                    notes[sys_name] = f"unavailable: {type(e).__name__}"

            chosen = select_config(D, causal, S, S, B * Hq, q.dtype)
            sweep = not args.quick and not args.no_sweep
            configs = candidate_configs(D, causal, S, S, B * Hq, q.dtype) if sweep else [chosen]
            if args.filter:
                wanted = args.filter.split("+")
                configs = [c for c in configs if c == chosen or any(w in config_str(c) for w in wanted)]
            per_config, best, best_cfg, first_error = {}, None, None, None
            out = torch.empty_like(q)
            for cfg in configs:
                label = config_str(cfg)
                try:
                    out.fill_(float("nan"))
                    flash_attention(q, k, v, causal=causal, config=cfg, out=out)
                    torch.cuda.synchronize()
                    problem = check(out, ref)
                except Exception as e:
                    problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if problem:
                    per_config[label] = f"error: {problem}"
                    first_error = first_error or f"{label}: {problem}"
                    print(f"  {name} [{label}] ERROR {problem}", file=sys.stderr)
                    continue
                tf = fl / time_ms(lambda: flash_attention(q, k, v, causal=causal, config=cfg, out=out),
                                  rep=args.rep) / 1e9
                per_config[label] = round(tf, 1)
                print(f"  {name} [{label}] {tf:.1f} TFLOP/s", flush=True)
                if best is None or tf > best:
                    best, best_cfg = tf, cfg
            extra = {"per_config": per_config, "selected_config": config_str(chosen)}
            if not str(per_config.get(config_str(chosen), "error")).startswith("error"):
                # GPU-only time of the selected config (and of its twin: on the other load path, TMA <-> pointers,
                # or for a warp-specialised pick the table's unspecialised one) and of SDPA default and FA2, in
                # interleaved rounds (graph_rounds), and kernopt's host launch cost per call.
                if chosen.get("WARP_SPEC"):
                    twin = select_config(D, causal, S, S, B * Hq, q.dtype, warp_spec=False)
                    twin_name = "unspecialised"
                else:
                    twin = dict(chosen, TMA=not chosen.get("TMA", False))
                    twin_name = "pointers" if chosen.get("TMA") else "tma"
                calls = {"kernopt": lambda: flash_attention(q, k, v, causal=causal, config=chosen, out=out),
                         "kernopt_" + twin_name: lambda: flash_attention(q, k, v, causal=causal, config=twin, out=out)}
                if args.graph_all:  # every checked candidate of the sweep in the same interleaved rounds
                    for cfg in configs:
                        label = config_str(cfg)
                        if cfg != chosen and not str(per_config.get(label, "error")).startswith("error"):
                            calls["cand " + label] = (
                                lambda cfg=cfg: flash_attention(q, k, v, causal=causal, config=cfg, out=out))
                for sys_name in ("sdpa_default", "sdpa_flash"):
                    if sys_name in results:
                        calls[sys_name] = sdpa_call(q, k, v, causal, backends[sys_name])[0]
                med, spread = graph_rounds(calls)
                graph = {n: round(fl / ms / 1e9, 1) for n, ms in med.items()}
                extra["graph_spread_tflops"] = {n: [round(fl / v[1] / 1e9, 1), round(fl / v[0] / 1e9, 1)]
                                                for n, v in spread.items() if not isinstance(v, str)}
                notes.update({f"graph_{n}": v for n, v in spread.items() if isinstance(v, str)})
                host = {n: round(host_us(fn), 1) for n, fn in calls.items() if n.startswith("kernopt")}
                extra["graph_tflops"], extra["host_us"] = graph, host
                print(f"  {name} [{config_str(chosen)}] graph TFLOP/s {graph}, host us/call {host}", flush=True)
            if notes:
                extra["notes"] = notes
            if best is None:
                suite.add(name, "TFLOP/s", True, {"kernopt": 0.0, **results}, error=first_error or "no config ran",
                          **extra)
            else:
                suite.add(name, "TFLOP/s", True, {"kernopt": best, **results}, config=config_str(best_cfg),
                          **extra)
            del q, k, v, ref, out
            torch.cuda.empty_cache()

    print(suite.table())
    path = suite.write(args.out, plot=args.plot)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
