"""SASS loops of any tests/kernels/sm90_offline.py case, compiled offline for sm_90a (no GPU): instructions by opcode.

benchmarks/sass_loop.py does this for int4_gemm configs; this takes a case of the offline compile table instead,
so any kernel the table compiles (warp-specialised attention included, whose partitions each have their loop)
can be compared before it is timed.

    python benchmarks/sass_case.py "flash D128 causal=1 WS 128x64 s2 dtma (probe flag)" [--loops 4] [--index 0]
    python benchmarks/sass_case.py --list            # the case names

Prints the kernel's registers and total instruction count, then the largest backward-branch ranges (loops) with
their instruction counts and opcode histograms.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions: before triton is imported
os.environ.pop("KERNOPT_CPU", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sass_loop  # noqa: E402
import sm90_offline as so  # noqa: E402


def compile_case(name: str, index: int = 0) -> tuple[str, str, str]:
    """(kernel name, SASS text, registers) of the case's index-th launch."""
    _, launches = so.capture(so.find_case(name))
    launch = launches[index]
    return (launch.fn.__name__, *sass_loop.sass_of(launch))


def loops(sass: str) -> list[list[str]]:
    """Every backward branch's instruction range, largest first (nested ranges are listed on their own)."""
    addr_re = sass_loop._ADDR
    lines = [line for line in sass.splitlines() if addr_re.match(line)]
    addr = lambda line: int(addr_re.match(line).group(1), 16)  # noqa: E731
    out = {}
    for line in lines:
        target = re.search(r"BRA\s+.*?0x([0-9a-f]+)", line)
        if target and int(target.group(1), 16) < addr(line):
            lo, hi = int(target.group(1), 16), addr(line)
            out[(lo, hi)] = [x for x in lines if lo <= addr(x) <= hi]
    return sorted(out.values(), key=len, reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("case", nargs="?")
    ap.add_argument("--index", type=int, default=0, help="which launch of the case")
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list or not args.case:
        print("\n".join(c.name for c in so.CASES))
        return
    kernel, sass, regs = compile_case(args.case, args.index)
    total = [line for line in sass.splitlines() if sass_loop._ADDR.match(line)]
    print(f"{kernel}: registers {regs}, {len(total)} instructions")
    for body in loops(sass)[:args.loops]:
        print(f"  loop of {len(body)}: " + ", ".join(f"{op} {n}" for op, n in sass_loop.opcodes(body).most_common(14)))


if __name__ == "__main__":
    main()
