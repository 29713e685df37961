"""The `kernopt` command.

    kernopt explain [--model tiny|1B|8B] [--quantize int4|fp8] [--batch B] [--seq S]
    kernopt bench [llama options]        the llama suite (examples/bench_llama.py); other suites: examples/
    kernopt tune --model 1B|8B [--quantize int4|fp8] [--tokens 1,16,256,4096]
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2)


def _llama(name: str, device: str, dtype):
    import torch
    import transformers

    from kernopt.llama_bench import LLAMA

    cfg = transformers.LlamaConfig(max_position_embeddings=8192, **(TINY if name == "tiny" else LLAMA[name]))
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
    if args.quantize == "int4":
        from kernopt.int4 import quantize_int4_

        quantize_int4_(model, group_size=args.group_size)
    elif args.quantize == "fp8":
        from kernopt.fp8 import quantize_fp8_

        quantize_fp8_(model)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    report = kernopt.explain(model, ids, options={"scenario": args.scenario, "inner": args.inner})
    print(report.table())
    return 0


def gemm_jobs(model, tokens: Sequence[int]):
    """(kernel module, kernel name, M, N, K, extra) for every distinct linear shape of the model."""
    import torch.nn as nn

    shapes = set()
    for mod in model.modules():
        kind = type(mod).__name__
        if isinstance(mod, nn.Linear):
            shapes.add(("gemm", mod.out_features, mod.in_features, None))
        elif kind == "Int4Linear":
            shapes.add(("int4_gemm", mod.out_features, mod.in_features, mod.group_size))
        elif kind == "Fp8Linear":
            shapes.add(("fp8_gemm", mod.out_features, mod.in_features, None))
    return [(k, m, n, kk, extra) for (k, n, kk, extra) in sorted(shapes, key=str) for m in tokens]


def cmd_tune(args) -> int:
    import torch
    from tqdm import tqdm

    from kernopt import workload
    from kernopt.ops import kernel_module

    if not torch.cuda.is_available():
        print("kernopt tune: autotuning times kernels on a GPU; no CUDA device here", file=sys.stderr)
        return 2
    model = _llama(args.model, "meta", torch.bfloat16)
    if args.quantize:
        print("kernopt tune: quantized shapes are tuned from the float model's linear shapes", file=sys.stderr)
    tokens = [int(t) for t in args.tokens.split(",")]
    jobs = [("gemm", m, n, k, None) for (_, m, n, k, _) in gemm_jobs(model, tokens)]
    tuned = 0
    for kernel, m, n, k, _ in tqdm(jobs, desc="kernopt tune", unit="shape"):
        mod = kernel_module(kernel)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        key = workload.gemm_bucket(m, n, k, "none", torch.bfloat16)  # the key ops.linear looks up
        workload.autotune(kernel, key, mod.candidate_configs(m, n, k, "none"), lambda cfg: mod.gemm(x, w, config=cfg))
        tuned += 1
    print(f"tuned {tuned} shapes into {workload.config_cache().path}")
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    from kernopt.llama_bench import main as llama_main

    llama_main(list(argv))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    ap = argparse.ArgumentParser(prog="kernopt", description="kernopt: measured-speed torch.compile backend")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("explain", help="print what kernopt rewrites in a Llama built from a config")
    e.add_argument("--model", choices=["tiny", "1B", "8B"], default="tiny")
    e.add_argument("--quantize", choices=["int4", "fp8"], default=None)
    e.add_argument("--group-size", type=int, default=128)
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--seq", type=int, default=16)
    e.add_argument("--scenario", default="auto")
    e.add_argument("--inner", choices=["inductor", "eager"], default="eager")
    t = sub.add_parser("tune", help="autotune the kernels for a model's shapes and cache the configs")
    t.add_argument("--model", choices=["tiny", "1B", "8B"], default="8B")
    t.add_argument("--quantize", choices=["int4", "fp8"], default=None)
    t.add_argument("--tokens", default="1,16,256,4096")
    sub.add_parser("bench", help="the llama suite (see examples/bench_llama.py --help)")
    args = ap.parse_args(argv)
    return {"explain": cmd_explain, "tune": cmd_tune}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
