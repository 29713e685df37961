"""Which CUDA graphs a kernopt `generate` records, call by call: wall time, graphs recorded / re-recorded,
warm-up runs and Dynamo compiles per call, for a sequence of generate calls of two lengths (the llama suite's
pattern: 128 new tokens, then 1). With ``--log`` Inductor's cudagraphs log (recordings and their reasons) goes
to <out>/cudagraphs-<system>.log.

    python benchmarks/prompt_graph_probe.py [--shape 1B] [--systems kernopt_int4,kernopt_int4_prompt_nographs]
                                            [--new 32] [--calls 4] [--out DIR] [--log]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

from kernopt.benchmark import require_cuda
from kernopt.llama_bench import build, cudagraph_tree_counts, dynamo_counts, prepare, system_env


def probe(system: str, shape: str, prompt: int, new: int, calls: int, log_path: str | None) -> list[dict]:
    torch._dynamo.reset()
    handler = None
    if log_path:
        torch._logging.set_logs(cudagraphs=True)
        handler = logging.FileHandler(log_path, mode="w")
        logging.getLogger("torch._inductor.cudagraph_trees").addHandler(handler)
    model = prepare(system, build(shape, "cuda"), "cuda")
    ids = torch.randint(100, 20000, (1, prompt), device="cuda")
    rows = []
    plan = [new] * calls + [1] * 2 + [new] * 2
    with torch.no_grad():
        for i, n in enumerate(plan):
            before = dynamo_counts()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            after = dynamo_counts()
            row = {"call": i, "new": n, "ms": round(ms, 2), **{k: after[k] - before[k] for k in after}}
            rows.append(row)
            print(system, row, flush=True)
    if handler is not None:
        logging.getLogger("torch._inductor.cudagraph_trees").removeHandler(handler)
        torch._logging.set_logs()
    print(system, "tree totals", cudagraph_tree_counts(), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1B")
    ap.add_argument("--systems", default="kernopt_int4,kernopt_int4_prompt_nographs")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--log", action="store_true")
    args = ap.parse_args()
    require_cuda("prompt_graph_probe")
    result = {}
    for system in args.systems.split(","):
        with system_env(system):
            log = os.path.join(args.out, f"cudagraphs-{system}.log") if args.log else None
            result[system] = probe(system, args.shape, args.prompt, args.new, args.calls, log)
    path = os.path.join(args.out, f"prompt_graph_probe-{args.shape}.json")
    with open(path, "w") as f:
        json.dump({"shape": args.shape, "prompt": args.prompt, "torch": torch.__version__,
                   "device": torch.cuda.get_device_name(), "commit": os.environ.get("KERNOPT_COMMIT"),
                   "calls": result}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
