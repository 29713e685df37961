"""Same-process A/B of a switch read at call time, over the llama suite's compiled prompt forward.

Why: the GPU host's speed moved 10-50 % between machines and between the systems of one suite run (benchmarks/
NOTES.md, seventeenth session), so a host-side change worth a few ms (kernopt/ops.py's int4 prompt lane) cannot be
told from noise by two suite systems. Here one model is built and its forward compiled once (as the suite's
`prefill b1 s<prompt>` row: `torch.compile(model.forward, backend="kernopt")`, no CUDA graphs); then rounds of
calls alternate between the environment as it is (A) and with --env-b set (B). Only switches read at call time
make sense here (KERNOPT_INT4_LANE); switches read by the passes at compile time are fixed by the first call
(use the suite's systems for those).

    python benchmarks/env_ab.py [--shape 1B] [--system kernopt_int4_prompt_kernel] [--env-b KERNOPT_INT4_LANE=0]
                                [--prompt 2048] [--calls 10] [--rounds 8] [--out DIR]

Each round times --calls forwards from a synchronised start to a synchronised end (host and GPU: what a caller
waits) and reports ms per call. Writes env_ab-<gpu>.json (one row per side: the median, every round's value) under
--out (default benchmarks/results/sweeps/env_ab).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from kernopt.benchmark import Suite, env_vars, require_cuda
from kernopt.llama_bench import build, prepare, system_env


def _timed(fwd, ids, calls: int) -> float:
    """ms per call over `calls` back-to-back forwards, synchronised at both ends."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fwd(ids)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1B")
    p.add_argument("--system", default="kernopt_int4_prompt_kernel")
    p.add_argument("--env-b", default="KERNOPT_INT4_LANE=0", help="NAME=VALUE set for side B")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/sweeps/env_ab")
    args = p.parse_args()
    require_cuda("env_ab.py")
    name, _, value = args.env_b.partition("=")
    if not name or not _:
        raise SystemExit(f"--env-b wants NAME=VALUE, got {args.env_b!r}")
    times: dict[str, list[float]] = {"A": [], "B": []}
    with system_env(args.system), torch.no_grad():
        model = prepare(args.system, build(args.shape, "cuda"), "cuda")
        fwd = torch.compile(model.forward, backend="kernopt")
        ids = torch.randint(100, 20000, (1, args.prompt), device="cuda")
        for side in ("A", "B", "A", "B"):  # compile, then warm both sides
            with env_vars(**({name: value} if side == "B" else {})):
                _timed(fwd, ids, 2)
        for r in range(args.rounds):
            order = ("A", "B") if r % 2 == 0 else ("B", "A")  # neither side always runs first
            for side in order:
                with env_vars(**({name: value} if side == "B" else {})):
                    times[side].append(_timed(fwd, ids, args.calls))
            print(f"round {r}: A {times['A'][-1]:.3f} ms, B {times['B'][-1]:.3f} ms", flush=True)
    suite = Suite("env_ab")
    case = f"{args.shape} {args.system} prefill b1 s{args.prompt}"
    for side, label in (("A", "as set"), ("B", args.env_b)):
        suite.add(f"{case} [{label}]", "ms", False, {args.system: statistics.median(times[side])},
                  rounds_ms=[round(t, 4) for t in times[side]], calls_per_round=args.calls)
    ratios = [b / a for a, b in zip(times["A"], times["B"])]
    print(suite.table())
    print(f"B / A per round: {' '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f}")
    print(f"wrote {suite.write(Path(args.out))}")


if __name__ == "__main__":
    main()
