"""SASS of an int4_gemm kernel's K loop, compiled offline for sm_90a (no GPU): instructions by opcode.

At M=1 the int4 GEMVs are issue-bound (ncu on the H200: benchmarks/results/profiles/ncu-int4-gemv2-*.txt), so
the loop's instruction count per nibble is a fair proxy for a variant's speed before it is timed. Compiles
through tests/kernels/sm90_offline.py (the same specialisation a GPU launch gets) and reads the cubin with
the cuobjdump that Triton's wheel carries.

    python benchmarks/sass_loop.py '{"impl": "gemv2", "BLOCK_M": 1, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 8,
                                     "PREFETCH": 1, "num_warps": 4, "num_stages": 1}' [--x-dtype float32] [--dump F]

"Per nibble" divides the loop by BLOCK_N * BLOCK_K / threads: the nibbles one thread handles per iteration.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions: before triton is imported
os.environ.pop("KERNOPT_CPU", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))

import sm90_offline as so  # noqa: E402
import torch  # noqa: E402

_ADDR = re.compile(r"\s+/\*([0-9a-f]{4,})\*/")


def compile_sass(cfg: dict, M: int, N: int, K: int, group: int, x_dtype: torch.dtype,
                 symmetric: bool = False) -> tuple[str, str]:
    """(SASS text, ptxas register count) of the int4 kernel that int4_gemm launches for this config."""
    from kernopt.kernels import int4_gemm as q4

    qweight = torch.empty((K // 8, N), dtype=torch.int32).t()
    scales = torch.empty((K // group, N), dtype=torch.bfloat16).t()
    zeros = None if symmetric else torch.empty((K // group, N), dtype=torch.bfloat16).t()
    with so.Recorder() as rec:
        if cfg.get("impl") == "tcasm" or cfg.get("PAIRS"):
            rec.override(ASM=True)  # what a CUDA launch passes (the inline-PTX unpack)
        q4.int4_gemm(torch.empty((M, K), dtype=x_dtype), qweight, scales, zeros, group, config=cfg)
    return sass_of(next(launch for launch in rec.launches if "int4" in launch.fn.__name__))


def sass_of(launch) -> tuple[str, str]:
    """(SASS text, register count) of one recorded launch (sm90_offline's Launch), compiled for sm_90a."""
    from triton import knobs
    from triton.compiler import compile as triton_compile, make_backend

    src, options, _ = so.specialize(launch, make_backend(so._target()))
    with contextlib.redirect_stdout(io.StringIO()):
        compiled = triton_compile(src, target=so._target(), options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True).stdout
    return sass, str(so._resource_usage(compiled.asm["cubin"]).get("regs", "?"))


def loop_body(sass: str) -> list[str]:
    """The instructions of the longest predicated backward branch's range (the K loop; an unpredicated one jumps
    back from an out-of-line stub, e.g. an mbarrier wait's retry, and spans the epilogue)."""
    lines = [line for line in sass.splitlines() if _ADDR.match(line)]
    addr = lambda line: int(_ADDR.match(line).group(1), 16)  # noqa: E731
    best: list[str] = []
    for line in lines:
        target = re.search(r"@!?U?P\w+\s+BRA\s+.*?0x([0-9a-f]+)", line)
        if target and int(target.group(1), 16) < addr(line):
            lo, hi = int(target.group(1), 16), addr(line)
            body = [x for x in lines if lo <= addr(x) <= hi]
            best = body if len(body) > len(best) else best
    return best or lines


def opcodes(lines: list[str]) -> collections.Counter:
    count: collections.Counter = collections.Counter()
    for line in lines:
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            count[m.group(1)] += 1
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", help="the int4_gemm config, as JSON")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--x-dtype", default="bfloat16")
    ap.add_argument("--symmetric", action="store_true", help="weights without zero points")
    ap.add_argument("--dump", help="write the loop's SASS here")
    args = ap.parse_args()
    cfg = json.loads(args.config)
    sass, regs = compile_sass(cfg, args.m, args.n, args.k, args.group, getattr(torch, args.x_dtype),
                              args.symmetric)
    body = loop_body(sass)
    if cfg.get("impl") == "ldmma":  # each warp its own K chunk; the loop runs 2 chunks (AHEAD 2: 3, STAGES: 1) an iteration
        # (the TMA ring: SPS steps a slot, one slot an iteration)
        steps = int(cfg.get("SPS", 1)) if cfg.get("STAGES") else 1 + int(cfg.get("AHEAD", 1))
        nibbles = cfg.get("BLOCK_N", 32) * cfg.get("BLOCK_K", 128) / 32 * steps
    else:
        nibbles = cfg["BLOCK_N"] * cfg["BLOCK_K"] / (32 * cfg.get("num_warps", 4))
    print(f"registers {regs}; K loop {len(body)} instructions, {len(body) / nibbles:.2f} per nibble per thread "
          f"({8 * len(body) / nibbles:.2f} per word)")
    print(", ".join(f"{op} {n}" for op, n in opcodes(body).most_common()))
    if args.dump:
        Path(args.dump).write_text("\n".join(body) + "\n")


if __name__ == "__main__":
    main()
