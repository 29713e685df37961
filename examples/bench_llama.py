"""The `llama` suite: eager, HF static cache + Inductor, and kernopt (bf16, int4, fp8), end to end.

    python examples/bench_llama.py                 # 1B and 8B shapes, bs 1 and 16
    python examples/bench_llama.py --quick         # 1B, bs 1, 32 new tokens
Same as `kernopt bench llama`. Writes benchmarks/results/llama-<gpu>.json and a PNG plot.
"""
from kernopt.llama_bench import errors, main

if __name__ == "__main__":
    raise SystemExit(1 if errors(main()["results"]) else 0)  # a system that failed its check fails the run
