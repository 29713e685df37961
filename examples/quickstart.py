"""kernopt quickstart: a Llama built from a config (random weights, no download), eager vs kernopt.

    python examples/quickstart.py            # 1B-shaped Llama on a GPU, a small one on CPU
    python examples/quickstart.py --small    # the small one anywhere

Prints the max |difference| of the logits, what kernopt rewrote (kernopt.explain), and the time of one
forward pass side by side. On a machine without CUDA it says plainly that the kernels ran as their
plain-torch references (nothing there is faster; the point is that it runs and matches).
"""
from __future__ import annotations

import argparse
import time

import torch
import transformers

import kernopt


def build(small: bool, device: str, dtype: torch.dtype):
    if small:
        cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    else:  # Llama-3.2-1B shapes
        cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                       num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                       max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def timed(fn, device: str, reps: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small model even on a GPU")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=None, help="prompt length (default 512 on GPU, 32 on CPU)")
    ap.add_argument("--inner", choices=["inductor", "eager"], default=None)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    small = args.small or not cuda
    seq = args.seq or (512 if cuda else 32)
    inner = args.inner or ("inductor" if cuda else "eager")
    model = build(small, device, dtype)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, seq), device=device)
    print(f"model: Llama {'small' if small else '1B-shape'} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"params, random weights), {str(dtype).replace('torch.', '')} on {device}, input {args.batch}x{seq}")

    report = kernopt.explain(model, ids, options={"inner": inner})
    print(report.table())

    compiled = torch.compile(model, backend="kernopt", options={"inner": inner})
    baseline = torch.compile(model, backend="inductor") if cuda else None
    with torch.no_grad():
        ref = model(ids).logits.float()
        out = compiled(ids).logits.float()
        print(f"\nmax |logits diff| kernopt vs eager: {(out - ref).abs().max().item():.4g} "
              f"(logit scale {ref.abs().max().item():.3g})")
        reps = 10 if cuda else 2
        rows = [("eager", timed(lambda: model(ids), device, reps))]
        if baseline is not None:
            rows.append(("inductor", timed(lambda: baseline(ids), device, reps)))
        rows.append((f"kernopt (inner={inner})", timed(lambda: compiled(ids), device, reps)))
    print("\nforward pass time (mean of %d after one warm-up):" % reps)
    for name, ms in rows:
        print(f"  {name:28s} {ms:9.2f} ms")


if __name__ == "__main__":
    main()
