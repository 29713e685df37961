"""The `llama` suite (shared/BENCHMARKS.md): Llama shapes from a config, random weights, end to end.

Systems, in one process on the same inputs:
- ``eager``: transformers as shipped (SDPA attention, dynamic cache), no compile;
- ``hf_static_inductor``: HF's static cache, whose decode steps transformers compiles itself with Inductor
  (mode="reduce-overhead": CUDA graphs);
- ``kernopt`` / ``kernopt_int4`` / ``kernopt_fp8``: `kernopt.optimize(model, quantize=..., cache="static")`.
Cases: decode tok/s at bs 1 and 16 (prompt 128, 128 new tokens; the whole `generate` call, after a warm-up
call), prefill ms at b1 s2048 (one forward), first-call seconds (the first `generate`, compile included).
Check, in the same run: each kernopt system's compiled prefill logits against the same (quantized) model run
eagerly — its plain-torch reference — by cosine similarity; the cosine to the bf16 model's logits is recorded
beside it as the quantization's own error (random weights are a worst case for round-to-nearest).
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

LLAMA = {
    "1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}
SYSTEMS = ("eager", "hf_static_inductor", "kernopt", "kernopt_int4", "kernopt_fp8")
MIN_COSINE = 0.995  # compiled kernopt vs its own eager reference, bf16


def build(shape: str):
    import transformers

    cfg = transformers.LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, **LLAMA[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = transformers.LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
    model.generation_config.pad_token_id = 0
    return model.eval()


def _sync_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def prepare(system: str, model):
    import kernopt

    if system == "eager":
        return model
    if system == "hf_static_inductor":
        model.generation_config.cache_implementation = "static"
        return model
    quantize = {"kernopt": None, "kernopt_int4": "int4", "kernopt_fp8": "fp8"}[system]
    return kernopt.optimize(model, quantize=quantize, cache="static")


def run_system(system: str, shape: str, batch_sizes, prompt: int, new: int, prefill_len: int, ref_logits):
    # Each system starts from an empty Dynamo cache: HF's forward is one code object for all systems, and
    # earlier systems' compiles must not count against this one's recompile limit.
    torch._dynamo.reset()
    model = prepare(system, build(shape))
    out: dict = {}
    with torch.no_grad():
        ids = torch.randint(100, 20000, (1, prefill_len), device="cuda")
        fwd = model.forward if system == "eager" else torch.compile(
            model.forward, backend="inductor" if system == "hf_static_inductor" else "kernopt")
        reference = model(ids).logits[0, -64:].float()  # eager: the plain-torch reference of this system
        logits = fwd(ids).logits[0, -64:].float()
        if system.startswith("kernopt"):
            cos = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0).item()
            out["cosine_vs_reference"] = cos
            if cos < MIN_COSINE:
                out["error"] = f"prefill logits cosine {cos:.4f} < {MIN_COSINE} vs the eager reference"
            if ref_logits is not None:
                out["cosine_vs_bf16"] = torch.nn.functional.cosine_similarity(
                    logits.flatten(), ref_logits.flatten(), dim=0).item()
        for _ in range(2):
            fwd(ids)
        reps = [_sync_time(lambda: fwd(ids)) for _ in range(5)]
        out["prefill_ms"] = sorted(reps)[2] * 1e3
        for bs in batch_sizes:
            prompt_ids = torch.randint(100, 20000, (bs, prompt), device="cuda")
            gen = lambda: model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                         max_new_tokens=new, min_new_tokens=new)
            first = _sync_time(gen)
            if bs == batch_sizes[0]:
                out["first_call_s"] = first
            t = min(_sync_time(gen) for _ in range(2))
            out[f"decode_bs{bs}"] = bs * new / t
    del model, fwd
    gc.collect()
    torch.cuda.empty_cache()
    return out, (reference if system == "eager" else None)


def _suite(all_results: dict, batch_sizes, prefill: int):
    from kernopt.benchmark import Suite

    suite = Suite("llama")
    for shape, results in all_results.items():
        def row(case, key, metric, hib):
            vals = {s: r[key] for s, r in results.items() if key in r and not (s.startswith("kernopt") and "error" in r)}
            errs = "; ".join(f"{s}: {r['error']}" for s, r in results.items() if "error" in r)
            cos = {s: round(r["cosine_vs_reference"], 5) for s, r in results.items() if "cosine_vs_reference" in r}
            qerr = {s: round(r["cosine_vs_bf16"], 5) for s, r in results.items() if "cosine_vs_bf16" in r}
            if vals:
                extra = {"errors": errs} if errs else {}
                if cos:
                    extra["prefill_logits_cosine_vs_reference"] = cos
                    extra["prefill_logits_cosine_vs_bf16"] = qerr
                suite.add(case, metric, hib, vals, **extra)
        for bs in batch_sizes:
            row(f"{shape} decode bs{bs}", f"decode_bs{bs}", "tok/s", True)
        row(f"{shape} prefill b1 s{prefill}", "prefill_ms", "ms", False)
        row(f"{shape} first-call s", "first_call_s", "s", False)
    return suite


def main(argv=None) -> None:
    from kernopt.benchmark import require_cuda

    ap = argparse.ArgumentParser(description="kernopt llama suite")
    ap.add_argument("--shapes", default="1B,8B")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="1B, bs1, 32 new tokens")
    args = ap.parse_args(argv)
    require_cuda("kernopt bench llama")
    if args.quick:
        args.shapes, args.batch_sizes, args.new = "1B", "1", 32
    shapes = args.shapes.split(",")
    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; valid: {', '.join(SYSTEMS)}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    all_results: dict[str, dict] = {}
    for shape in shapes:
        results, ref = all_results.setdefault(shape, {}), None
        for system in systems:
            print(f"[llama] {shape} {system} ...", flush=True)
            try:
                res, logits = run_system(system, shape, batch_sizes, args.prompt, args.new, args.prefill, ref)
            except Exception as e:  # one system failing must not lose the others' numbers
                res, logits = {"error": f"{type(e).__name__}: {e}"[:400]}, None
            if logits is not None:
                ref = logits
            results[system] = res
            print(f"[llama] {shape} {system}: {res}", flush=True)
            suite = _suite(all_results, batch_sizes, args.prefill)
            suite.write(args.out)  # after every system: a run cut short keeps what it measured
    suite = _suite(all_results, batch_sizes, args.prefill)
    print(suite.table())
    print("wrote", suite.write(args.out, plot=True))


if __name__ == "__main__":
    main()
