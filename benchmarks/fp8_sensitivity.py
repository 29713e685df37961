"""How far do tiny activation differences move a random-weight Llama's fp8 logits? (CPU, no GPU needed.)

The llama suite checks each kernopt system's compiled prefill logits against the same model run eagerly on its
plain-torch references (cosine >= 0.995). kernopt_fp8 at the 8B shape failed that check on the H200 (0.920).
The fp8 path quantizes every linear's input to e4m3 per token. e4m3 has 3 mantissa bits, so a code is
1/16 of its value wide, and an input that moves by one ulp of bf16 can land on the other side of a rounding
boundary. The fused RMSNorm + quantization kernel sums in another order than the reference, and that is
such a move. This script measures how far such moves carry through a whole model. It builds the suite's
Llama shape with random weights (fp32, CPU) and quantizes it with kernopt.fp8. It then compares the
prefill logits of:

- the float model and the fp8 reference (the quantization's own error: the suite's `cosine_vs_bf16`);
- the fp8 reference and the same reference whose quantizer sees its input moved by 2^-8 relative on a
  random `--fraction` of elements (about one bf16 ulp here and there, as a different summation order gives).

    python benchmarks/fp8_sensitivity.py [--shape 1B] [--layers N] [--tokens 64] [--fraction 0.01,0.1]

If the perturbed cosine sits near the suite's 0.920 at the same depth, the check's threshold cannot hold for
fp8 on random weights, whatever the kernels do; if it stays near 1, the 0.920 points at a defect.
"""
from __future__ import annotations

import argparse
import json

import torch

from kernopt.kernels import fp8_gemm
from kernopt.llama_bench import LLAMA, build


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].double()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1B", choices=sorted(LLAMA))
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--fraction", default="0.01,0.1", help="fractions of quantizer inputs moved, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.layers:
        LLAMA[args.shape] = {**LLAMA[args.shape], "num_hidden_layers": args.layers}
    model = build(args.shape, "cpu")
    ids = torch.randint(100, min(20000, model.config.vocab_size), (1, args.tokens),
                        generator=torch.Generator().manual_seed(args.seed))
    float_logits = logits(model, ids)

    from kernopt.fp8 import quantize_fp8_

    quantize_fp8_(model)
    fp8_logits = logits(model, ids)
    out = {"shape": args.shape, "layers": model.config.num_hidden_layers, "tokens": args.tokens,
           "cosine_fp8_vs_float": round(cosine(fp8_logits, float_logits), 5), "perturbed": {}}
    original = fp8_gemm.quantize_rows_fp8_ref
    for frac in (float(f) for f in args.fraction.split(",")):
        gen = torch.Generator().manual_seed(args.seed + 1)

        def moved(x, _frac=frac, _gen=gen):
            hit = torch.rand(x.shape, generator=_gen) < _frac
            sign = torch.where(torch.rand(x.shape, generator=_gen) < 0.5, -1.0, 1.0)
            return original(torch.where(hit, x * (1 + sign * 2.0 ** -8), x).to(x.dtype))

        fp8_gemm.quantize_rows_fp8_ref = moved
        try:
            out["perturbed"][str(frac)] = round(cosine(logits(model, ids), fp8_logits), 5)
        finally:
            fp8_gemm.quantize_rows_fp8_ref = original
    print(json.dumps(out))


if __name__ == "__main__":
    main()
