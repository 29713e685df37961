"""The `kernopt` command.

    kernopt explain [--model tiny|1B|8B] [--quantize int4|fp8] [--batch B] [--seq S]
    kernopt bench [llama] [llama options] the llama suite (examples/bench_llama.py); other suites: examples/
                                         (--device cpu --shapes tiny: a CPU smoke test of the suite)
    kernopt tune --model 1B|8B [--quantize int4|fp8] [--tokens 1,16,256,4096]
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

MODELS = ("tiny", "1B", "8B")  # the Llama shapes of kernopt/llama_bench.py's LLAMA


def _llama(name: str, device: str, dtype):
    import torch
    import transformers

    from kernopt.llama_bench import LLAMA

    cfg = transformers.LlamaConfig(max_position_embeddings=8192, **LLAMA[name])
    torch.manual_seed(0)
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = transformers.LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
    return model.eval()


def cmd_explain(args) -> int:
    import torch

    import kernopt

    cuda = torch.cuda.is_available()
    if args.model != "tiny" and not cuda:
        print(f"kernopt explain: --model {args.model} needs a GPU here; use --model tiny on CPU", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = _llama(args.model, device, dtype)
    if args.quantize == "int4":  # as optimize() does: quantize, and lay linears of one input side by side
        from kernopt.hf import _tiny_forward
        from kernopt.int4 import quantize_int4_grouped_

        quantize_int4_grouped_(model, group_size=args.group_size, run=_tiny_forward(model))
    elif args.quantize == "fp8":
        from kernopt.fp8 import quantize_fp8_grouped_
        from kernopt.hf import _tiny_forward

        quantize_fp8_grouped_(model, run=_tiny_forward(model))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    report = kernopt.explain(model, ids, options={"scenario": args.scenario, "inner": args.inner})
    print(report.table())
    return 0


def linear_shapes(model, groups=()) -> list[tuple[int, int]]:
    """The distinct (N, K) of the model's linear layers, and of each group of linears that runs as one launch
    (`groups` of module names, e.g. int4's q/k/v and gate/up: their widths summed)."""
    import torch.nn as nn

    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, nn.Linear)}
    for names in groups:
        mods = [model.get_submodule(n) for n in names]
        shapes.add((sum(m.out_features for m in mods), mods[0].in_features))
    return sorted(shapes)


def int4_x_dtype(m: int, n: int, k: int, group_size: int, dtype, symmetric: bool = True):
    """The x dtype of an int4 launch of m x [n, k] in a compiled model: float32 where the int4 pass gives the
    op x.float() (passes/int4.py: gemv_takes_float_x), else `dtype`. Tuning times that dtype and stores under
    its bucket (workload.gemm_bucket keys on it), or the decode launches would miss it."""
    import torch

    from kernopt.passes.int4 import gemv_takes_float_x

    return torch.float32 if gemv_takes_float_x(m, n, k, group_size, dtype, symmetric=symmetric) else dtype


def tune_job(kind: str, m: int, n: int, k: int, group_size: int):
    """(kernel, cache key, candidates, run, check, timer) for one shape: the key the op looks up
    (kernopt/ops.py), and the same check and timer as the ops' first-use tuning (ops.tuning_kit)."""
    import torch

    from kernopt import workload
    from kernopt.ops import int4_bucket_tag, kernel_module, tuning_kit

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    if kind == "int4":
        from kernopt.int4 import n_contiguous, quantize_weight

        mod = kernel_module("int4_gemm")
        qw, sc, z = (n_contiguous(t) if t is not None else None for t in quantize_weight(w, group_size))
        x = x.to(int4_x_dtype(m, n, k, group_size, x.dtype, symmetric=z is None))
        kernel, key = "int4_gemm", workload.gemm_bucket(m, n, k, int4_bucket_tag(group_size, z is None), x.dtype)
        candidates, operands = mod.candidate_configs(m, n, k, group_size), (x, qw, sc, z)
        call = lambda cfg, x, q, s, z: mod.int4_gemm(x, q, s, z, group_size, config=cfg)  # noqa: E731
        reference = lambda x, q, s, z: mod.int4_gemm_ref(x, q, s, z, group_size)  # noqa: E731
    elif kind == "fp8":
        mod = kernel_module("fp8_gemm")
        kernel, key = "fp8_gemm", workload.gemm_bucket(m, n, k, x.dtype)
        candidates, operands = mod.candidate_configs(m, n, k), (x, *mod.quantize_weight_fp8(w))
        call = lambda cfg, x, w8, ws: mod.fp8_linear(x, w8, ws, config=cfg)  # noqa: E731
        reference = mod.fp8_linear_ref
    else:
        mod = kernel_module("gemm")
        kernel, key = "gemm", workload.gemm_bucket(m, n, k, "none", x.dtype)
        candidates, operands = mod.candidate_configs(m, n, k, "none"), (x, w)
        call = lambda cfg, x, w: mod.gemm(x, w, config=cfg)  # noqa: E731
        reference = mod.gemm_ref
    return (kernel, key, candidates, lambda cfg: call(cfg, *operands), *tuning_kit(call, operands, reference))


def cmd_tune(args) -> int:
    import torch
    from tqdm import tqdm

    from kernopt import workload

    if not torch.cuda.is_available():
        print("kernopt tune: autotuning times kernels on a GPU; no CUDA device here", file=sys.stderr)
        return 2
    model = _llama(args.model, "meta", torch.bfloat16)
    tokens = [int(t) for t in args.tokens.split(",")]
    kind = args.quantize or "bf16"
    groups = []
    if kind in ("int4", "fp8"):  # the grouped launches' widths too (optimize() packs linears that read one input)
        from kernopt import fp8, int4
        from kernopt.int4 import linears_sharing_input

        groups = linears_sharing_input(model) if (int4 if kind == "int4" else fp8).grouping_enabled() else []
    jobs = [(m, n, k) for (n, k) in linear_shapes(model, groups) for m in tokens]
    for m, n, k in tqdm(jobs, desc=f"kernopt tune ({kind})", unit="shape"):
        kernel, key, candidates, run, check, timer = tune_job(kind, m, n, k, args.group_size)
        workload.autotune(kernel, key, candidates, run, check=check, timer=timer)
        torch.cuda.empty_cache()
    print(f"tuned {len(jobs)} shapes into {workload.config_cache().path}")
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    """`kernopt bench [llama] [options]`: the llama suite; exit status 1 when a system reported an error."""
    from kernopt.llama_bench import errors
    from kernopt.llama_bench import main as llama_main

    argv = list(argv)
    if argv[:1] == ["llama"]:  # the suite's name is optional: it is the only one behind `kernopt bench`
        argv = argv[1:]
    problems = errors(llama_main(argv)["results"])
    for p in problems:
        print(f"kernopt bench: error: {p}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    ap = argparse.ArgumentParser(prog="kernopt", description="kernopt: measured-speed torch.compile backend")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("explain", help="print what kernopt rewrites in a Llama built from a config")
    e.add_argument("--model", choices=MODELS, default="tiny")
    e.add_argument("--quantize", choices=["int4", "fp8"], default=None)
    e.add_argument("--group-size", type=int, default=128)
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--seq", type=int, default=16)
    e.add_argument("--scenario", default="auto")
    e.add_argument("--inner", choices=["inductor", "eager"], default="eager")
    t = sub.add_parser("tune", help="autotune the kernels for a model's shapes and cache the configs")
    t.add_argument("--model", choices=MODELS, default="8B")
    t.add_argument("--quantize", choices=["int4", "fp8"], default=None)
    t.add_argument("--group-size", type=int, default=128)
    t.add_argument("--tokens", default="1,16,256,4096")
    sub.add_parser("bench", help="the llama suite (see examples/bench_llama.py --help)")
    args = ap.parse_args(argv)
    return {"explain": cmd_explain, "tune": cmd_tune}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
