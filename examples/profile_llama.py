"""Where a system's decode time goes: GPU time per kernel over one `generate` call, from torch.profiler.

The llama suite (bench_llama.py) says how fast each system is; this says why. Each system of
kernopt/llama_bench.py is built, compiled and warmed exactly as the suite does it (two `generate` calls),
then one more call is profiled. The table lists kernels by total GPU time, with the time per generated
token beside it.

    python examples/profile_llama.py [--shape 8B] [--systems kernopt,kernopt_int4] [--prompt 128] [--new 32]
                                     [--forward] [--out DIR]

Writes ``profile-<shape>-<system>.txt`` per system under --out (default benchmarks/results/profiles).
``--forward``: one compiled forward of a [1, prompt] batch instead of a `generate` call, as the suite times
``prefill b1 s2048`` (``torch.compile(model.forward)`` with the system's backend); ``...-forward.txt``.
``--host``: where the host's time goes too: the profiler's events by self CPU time, and Python's cProfile of three
more calls (functions by own time), appended to the file; and whether the call waits on the GPU: the time until it
returns (no synchronisation) beside the time until its kernels are done, and the synchronising CUDA calls torch
reports in one more call (`torch.cuda.set_sync_debug_mode`), the first with its stack.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import time
import traceback
import warnings

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from kernopt.benchmark import require_cuda
from kernopt.llama_bench import EXTRA_SYSTEMS, LLAMA, SYSTEMS, build, prepare, system_env


def _sort_key(events) -> str:
    """The GPU-time column: torch >= 2.4 names it device time, older releases cuda time."""
    sample = next(iter(events), None)
    return "self_device_time_total" if sample is None or hasattr(sample, "self_device_time_total") \
        else "self_cuda_time_total"


def profile_system(system: str, shape: str, prompt: int, new: int, forward: bool = False,
                   host: bool = False) -> tuple[str, float, float]:
    torch._dynamo.reset()
    model = prepare(system, build(shape, "cuda"), "cuda")
    ids = torch.randint(100, 20000, (1, prompt), device="cuda")
    if forward:  # the suite's prefill: the forward compiled on its own (kernopt/llama_bench.py run_system)
        backend = "inductor" if system in ("eager", "hf_static_inductor") else "kernopt"
        fwd = model.forward if system == "eager" else torch.compile(model.forward, backend=backend)

    def gen():
        if forward:
            return fwd(ids)
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                              min_new_tokens=new)

    with torch.no_grad():
        gen()
        gen()
        torch.cuda.synchronize()
        walls = []
        for _ in range(3):  # unprofiled: the call's wall time as the suite would see it (the profiler adds its own)
            t0 = time.perf_counter()
            gen()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            gen()
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = _sort_key(events)
    # The table footer's "Self CUDA time total": kernels only, not the ranges that annotate them on the GPU
    # timeline (Inductor's "## Call CompiledFxGraph ##" carries its kernels' time again).
    gpu_us = sum(getattr(e, key) for e in events
                 if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    table = events.table(sort_by=key, row_limit=45, max_name_column_width=90)
    if host:
        table += "\n\nBy self CPU time:\n" + events.table(sort_by="self_cpu_time_total", row_limit=40,
                                                          max_name_column_width=90)
        py = cProfile.Profile()
        with torch.no_grad():
            py.enable()
            for _ in range(3):
                gen()
            torch.cuda.synchronize()
            py.disable()
        text = io.StringIO()
        pstats.Stats(py, stream=text).sort_stats("tottime").print_stats(45)
        table += "\n\ncProfile of three calls, by own time:\n" + text.getvalue() + "\n" + _waits(gen)
    return table, gpu_us, min(walls)


def _waits(gen) -> str:
    """Whether a call waits on the GPU: ms until it returns and until its kernels finish (best of 3 each), and the
    synchronising calls torch flags in one call (the first one's stack)."""
    def timed(rounds: int = 3) -> tuple[float, float]:
        issue, done = [], []
        for _ in range(rounds):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            gen()
            issue.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            done.append(time.perf_counter() - t0)
        return min(issue) * 1e3, min(done) * 1e3

    with torch.no_grad():
        issue, done = timed()
        gc.disable()  # Python's cyclic collector: does a collection land inside the call?
        try:
            issue_nogc, done_nogc = timed()
        finally:
            gc.enable()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                gen()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # (torch's "called a synchronizing CUDA operation"; not its notice that the mode is a prototype)
        syncs = [w for w in seen if "called a synchronizing" in str(w.message)]
        first = "".join(f"  {w.filename}:{w.lineno}: {str(w.message)[:160]}\n" for w in syncs[:10])
        if syncs:
            torch.cuda.set_sync_debug_mode("error")
            try:
                gen()
            except Exception:  # the first synchronising call raises
                first += "".join(traceback.format_exc().splitlines(keepends=True)[-40:])
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return (f"Waits: the call returned after {issue:.2f} ms, its kernels were done after {done:.2f} ms (best of 3); "
            f"with Python's garbage collector off {issue_nogc:.2f} / {done_nogc:.2f} ms; {len(syncs)} synchronising "
            f"CUDA calls flagged in one call\n" + first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8B", choices=sorted(LLAMA))
    ap.add_argument("--systems", default="kernopt,kernopt_int4",
                    help=f"comma-separated, from: {', '.join(SYSTEMS + EXTRA_SYSTEMS)}")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--forward", action="store_true", help="one compiled forward of the prompt, as the suite's prefill")
    ap.add_argument("--host", action="store_true", help="also the host's time: events by CPU time, and cProfile")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "profiles"))
    args = ap.parse_args()
    require_cuda("profile_llama.py")
    systems = [s for s in args.systems.replace("+", ",").split(",") if s]
    known = SYSTEMS + EXTRA_SYSTEMS
    unknown = [s for s in systems if s not in known]
    if unknown:
        ap.error(f"unknown systems {unknown}; known: {', '.join(known)}")
    os.makedirs(args.out, exist_ok=True)
    device = torch.cuda.get_device_name()
    for system in systems:
        with system_env(system):  # the experiment systems set their switches
            table, gpu_us, wall_s = profile_system(system, args.shape, args.prompt, args.new, args.forward,
                                                   args.host)
        gc.collect()
        torch.cuda.empty_cache()
        if args.forward:
            head = (f"{system} {args.shape} compiled forward of [1, {args.prompt}] on {device}, torch "
                    f"{torch.__version__}: {gpu_us / 1e3:.2f} ms of kernel time in one call; unprofiled, the call "
                    f"took {wall_s * 1e3:.2f} ms (best of 3)\n")
        else:
            head = (f"{system} {args.shape} bs1 prompt {args.prompt} new {args.new} on {device}, torch "
                    f"{torch.__version__}: {gpu_us / 1e3:.2f} ms of kernel time in one generate call, "
                    f"{gpu_us / args.new:.0f} us per new token (prefill included); unprofiled, the call took "
                    f"{wall_s * 1e3:.2f} ms (best of 3)\n")
        path = os.path.join(args.out, f"profile-{args.shape}-{system}{'-forward' if args.forward else ''}.txt")
        with open(path, "w") as f:
            f.write(head + table + "\n")
        print(head + table)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
