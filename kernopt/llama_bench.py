"""The `llama` suite (shared/BENCHMARKS.md): Llama shapes from a config, random weights, end to end.

Systems, in one process on the same inputs:
- ``eager``: transformers as shipped (SDPA attention, dynamic cache), no compile;
- ``hf_static_inductor``: HF's static cache, whose decode steps transformers compiles itself with Inductor
  (mode="reduce-overhead": CUDA graphs);
- ``kernopt`` / ``kernopt_int4`` / ``kernopt_fp8``: `kernopt.optimize(model, quantize=..., cache="static")`
  (its `generate` reads the stop flag one step late on CUDA, see `kernopt.hf.deferred_stop_checks`;
  ``KERNOPT_DEFER_STOP_CHECK=0`` runs transformers' per-step check instead, to split kernels from loop).
Cases: decode tok/s at bs 1 and 16 (prompt 128, 128 new tokens; the whole `generate` call, the fastest of
DECODE_TIMED_CALLS calls after a warm-up call, each call's seconds in the row's ``dynamo`` field as ``timed_s``),
prefill ms at b1 s2048 (one forward), first-call seconds (the first `generate`, compile included).
Check, in the same run: each kernopt system's compiled prefill logits against the same (quantized) model run
eagerly — its plain-torch reference — by cosine similarity; the cosine to the bf16 model's logits is recorded
beside it as the quantization's own error (random weights are a worst case for round-to-nearest).

Compiles are counted too (Dynamo's frame and graph counters, per call): the warm-up `generate` of each batch
size may compile, the timed calls after it must not. A kernopt system whose timed calls compiled anything is
an error (its numbers would time the compiler: the bug where every `generate` recompiled); the counts are in
each row's ``dynamo`` field for every system.

``--device cpu`` (shape ``tiny``) is a smoke test of this plumbing (every system end to end, kernopt ops as
their plain-torch references, fp32) before GPU time is spent; its numbers mean nothing, so they never go to
benchmarks/results: CPU runs write to ``--out`` or a fresh temporary directory.

    python -m kernopt.llama_bench --device cpu --batch-sizes 1,2 --new 4 --prompt 8 --prefill 16   # CPU smoke
    python -m kernopt.llama_bench --quick --cold-compile-caches     # GPU: 1B bs1; first calls compile cold
    python -m kernopt.llama_bench --shapes 8B --systems kernopt_int4,kernopt_fp8 --merge   # add to the JSON
The exit status is 1 when a system reported an error (a failed check, a recompile, an exception).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

LLAMA = {
    # A few layers, GQA, small vocab: the CPU smoke shape (K a multiple of the int4 group size 128).
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}
# Timed `generate` calls per batch size (the fastest counts): 5 since the seventh H200 session (2 before). HF
# static + Inductor's calls moved 118-137 tok/s between runs (it re-records its decode graph in every call), and
# the fastest of more calls is the steadier estimate of each system, the baseline included.
DECODE_TIMED_CALLS = 5

SYSTEMS = ("eager", "hf_static_inductor", "kernopt", "kernopt_int4", "kernopt_fp8")
# Not run unless named: kernopt bf16 with transformers' own synchronous decode loop (the stop flag read every
# step), to split what the deferred stop check is worth from what the kernels are worth.
# kernopt_int4_prompt_inductor / _prompt_kernel: kernopt_int4 with the compiled prompt's int4 linears of 17 rows or
# more left to Inductor's own dequantize + matmul / all on kernopt's op (passes/int4.py PROMPT_ENV; its default "auto"
# gives those of 192 rows or more kernopt.int4_weight under a plain linear). kernopt_int4_nolane: kernopt_int4
# without kernopt/ops.py's prompt lane (LANE_ENV=0).
# kernopt_int4_prompt_nographs: kernopt_int4 with the compiled prompt forward run
# without CUDA graphs (kernopt/hf.py, KERNOPT_PREFILL_CUDA_GRAPHS=0).
# kernopt_int4_unfused: kernopt_int4 with silu * mul after the gate/up GEMV, not in its epilogue (passes/int4.py
# SWIGLU_ENV=0). kernopt_int4_nocombo: kernopt_int4 without Inductor's combo kernels (kernopt/backend.py COMBO_ENV=0).
# kernopt_noappend / kernopt_int4_noappend: the decode step's rotary + static-cache write left to Inductor, not inside
# the decode attention kernel (passes/decode_append.py APPEND_ENV=0). kernopt_pdl / kernopt_int4_pdl: programmatic
# dependent launch for the decode path's kernels (kernels/pdl.py, KERNOPT_PDL=1). kernopt_nofold: kernopt bf16 with
# the compiled prompt's constant causal mask left a mask (passes/constant_mask.py FOLD_ENV=0). kernopt_nobounds: kernopt
# bf16 with a caller mask read on every key tile (kernels/flash_attention.py BOUNDS_ENV=0). kernopt_fp8_prompt_kernel:
# kernopt_fp8 with the prompt's fp8 linears on kernopt.fp8_linear, not the prompt lane (passes/fp8.py
# PROMPT_ENV=kernel).
# kernopt_fp8_nogemv: kernopt_fp8 with one-row fp8 linears on the swap-AB tensor-core kernel, not the gemv
# (kernels/fp8_gemm.py GEMV_ENV=0). kernopt_fp8_nogroup: kernopt_fp8 with one launch per linear, q/k/v and gate/up
# not packed nor grouped (kernopt/fp8.py GROUP_ENV=0).
# kernopt_int4_fp32 / _planes / _tcasm / _pairs128 / _pairs64 / _px / _split8: kernopt_int4 with the
# decode GEMV experiment of kernels/int4_gemm.py (GEMV_VARIANT_ENV) set for that system only. kernopt_int4_noldmma:
# kernopt_int4 with the int4 table's ldmma picks off (kernels/int4_gemm.py LDMMA_ENV=0). A system's name
# says what it quantizes to (quantize_of).
EXTRA_SYSTEMS = ("kernopt_sync", "kernopt_int4_fp32", "kernopt_int4_planes", "kernopt_int4_tcasm",
                 "kernopt_int4_prompt_inductor", "kernopt_int4_prompt_nographs", "kernopt_int4_pairs128",
                 "kernopt_int4_pairs64", "kernopt_int4_px", "kernopt_int4_unfused",
                 "kernopt_int4_nocombo", "kernopt_noappend", "kernopt_int4_noappend", "kernopt_pdl",
                 "kernopt_int4_pdl", "kernopt_int4_split8", "kernopt_int4_nolane",
                 "kernopt_int4_prompt_kernel", "kernopt_nofold",
                 "kernopt_nobounds", "kernopt_fp8_prompt_kernel", "kernopt_fp8_nogemv",
                 "kernopt_fp8_nogroup", "kernopt_int4_noldmma")
# The experiment switches each system sets for its own run (every other system runs with them unset, whatever
# the caller set): kernels/int4_gemm.py GEMV_VARIANT_ENV, passes/int4.py PROMPT_ENV and SWIGLU_ENV,
# kernopt/backend.py COMBO_ENV, passes/decode_append.py APPEND_ENV, kernels/pdl.py PDL_ENV, kernopt/ops.py LANE_ENV,
# passes/constant_mask.py FOLD_ENV, kernels/flash_attention.py BOUNDS_ENV, passes/fp8.py PROMPT_ENV,
# kernels/fp8_gemm.py GEMV_ENV, kernopt/fp8.py GROUP_ENV, kernels/int4_gemm.py LDMMA_ENV.
SYSTEM_ENV = {"kernopt_int4_fp32": {"KERNOPT_INT4_GEMV": "fp32"}, "kernopt_int4_planes": {"KERNOPT_INT4_GEMV": "planes"},
              "kernopt_int4_tcasm": {"KERNOPT_INT4_GEMV": "tcasm"},
              "kernopt_int4_pairs128": {"KERNOPT_INT4_GEMV": "pairs128"},
              "kernopt_int4_pairs64": {"KERNOPT_INT4_GEMV": "pairs64"}, "kernopt_int4_px": {"KERNOPT_INT4_GEMV": "px"},
              "kernopt_int4_split8": {"KERNOPT_INT4_GEMV": "split8"},
              "kernopt_int4_unfused": {"KERNOPT_INT4_SWIGLU": "0"},
              "kernopt_int4_nocombo": {"KERNOPT_INDUCTOR_COMBO": "0"},
              "kernopt_noappend": {"KERNOPT_DECODE_APPEND": "0"}, "kernopt_int4_noappend": {"KERNOPT_DECODE_APPEND": "0"},
              "kernopt_pdl": {"KERNOPT_PDL": "1"}, "kernopt_int4_pdl": {"KERNOPT_PDL": "1"},
              "kernopt_int4_prompt_inductor": {"KERNOPT_INT4_PROMPT": "inductor"},
              "kernopt_int4_prompt_kernel": {"KERNOPT_INT4_PROMPT": "kernel"},
              "kernopt_int4_prompt_nographs": {"KERNOPT_PREFILL_CUDA_GRAPHS": "0"},
              "kernopt_int4_nolane": {"KERNOPT_INT4_LANE": "0"}, "kernopt_nofold": {"KERNOPT_MASK_FOLD": "0"},
              "kernopt_nobounds": {"KERNOPT_MASK_BOUNDS": "0"},
              "kernopt_fp8_prompt_kernel": {"KERNOPT_FP8_PROMPT": "kernel"},
              "kernopt_fp8_nogemv": {"KERNOPT_FP8_GEMV": "0"}, "kernopt_fp8_nogroup": {"KERNOPT_FP8_GROUP": "0"},
              "kernopt_int4_noldmma": {"KERNOPT_INT4_LDMMA": "0"}}
DEVICES = ("cuda", "cpu")
MIN_COSINE = 0.995  # compiled kernopt vs its own eager reference, bf16
# Quantized systems pass when within MIN_COSINE of their eager reference, or at least as close to it as that
# reference is to the unquantized model. Per-token e4m3 activation codes are 1/16 of their value apart,
# so a one-ulp move of a quantizer's input (another summation order in a fused kernel) can flip a code.
# On random weights such flips carry through the layers: benchmarks/fp8_sensitivity.py (CPU) moved 1% / 10% of
# the inputs by 2^-8 and got logits cosines of 0.983 / 0.976 at the 8B width with 8 layers, and 0.982 /
# 0.977 at 1B (16 layers). The fp8 reference itself is 0.946-0.952 from the float model there.


def quantize_of(system: str) -> Optional[str]:
    """What optimize() quantizes to for a kernopt system: its name says (kernopt_int4*, kernopt_fp8*)."""
    return "int4" if system.startswith("kernopt_int4") else "fp8" if system.startswith("kernopt_fp8") else None


QUANTIZED = tuple(s for s in SYSTEMS + EXTRA_SYSTEMS if quantize_of(s))


def dtype_for(device: str) -> torch.dtype:
    """bf16 on the GPU (what is measured); fp32 on CPU, where bf16 would only be slower and add nothing."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def build(shape: str, device: str = "cuda"):
    import transformers

    cfg = transformers.LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, **LLAMA[shape])
    torch.manual_seed(0)
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype_for(device))
        try:
            model = transformers.LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
    model.generation_config.pad_token_id = 0
    return model.eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _sync_time(fn, device: str = "cuda") -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


# What the GPU did while a system's timed decode calls ran, sampled by nvidia-smi every SAMPLE_MS: at 1a9ca54 one
# of six kernopt_int4 runs took 3.24 ms per decode step against 2.70 in the five others (sweeps/repeat6), with HF
# and kernopt bf16 at their usual speed in the same process; these fields say next time whether clocks, power or
# temperature moved with it.
GPU_QUERY = ("clocks.sm", "clocks.mem", "temperature.gpu", "power.draw", "clocks_throttle_reasons.active",
             "utilization.gpu")
SAMPLE_MS = 100


class GpuSampler:
    """``with GpuSampler() as s: ...`` then ``s.summary()``: min / max SM and memory clocks (MHz), max temperature
    (C) and power (W), the throttle-reason masks seen (nvidia-smi's hex bit masks), min / mean GPU utilisation (%
    of each sample period with a kernel running: below ~100 while a decode loop runs, the GPU waited on the host),
    and the sample count. None where nvidia-smi is missing; the error, in ``summary()["error"]``, where it exits
    or prints what does not parse. Its polling does not slow the kernels (benchmarks/sampler_probe.py: the int4
    GEMV and decode attention within 0.03% with and without it, sweeps/sampler/)."""

    def __init__(self, device_index: Optional[str] = None):
        self.index = device_index if device_index is not None else _smi_index()
        self.proc = None
        self.text = ""

    def __enter__(self):
        cmd = ["nvidia-smi", f"--query-gpu={','.join(GPU_QUERY)}", "--format=csv,noheader,nounits",
               f"--loop-ms={SAMPLE_MS}", f"--id={self.index}"]
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError:
            self.proc = None
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.text, _ = self.proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.text, _ = self.proc.communicate()
        return False

    def summary(self) -> Optional[dict]:
        if self.proc is None:
            return None
        rows = []
        for line in self.text.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != len(GPU_QUERY):
                return {"error": self.text.strip()[:200]}
            try:
                rows.append((float(parts[0]), float(parts[1]), float(parts[2]), float(parts[3]), parts[4],
                             float(parts[5])))
            except ValueError:
                return {"error": line.strip()[:200]}
        if not rows:
            return {"error": "no samples"}
        col = list(zip(*rows))
        return {"sm_mhz": [min(col[0]), max(col[0])], "mem_mhz": [min(col[1]), max(col[1])],
                "max_temp_c": max(col[2]), "max_power_w": max(col[3]), "throttle": sorted(set(col[4])),
                "util_pct": [min(col[5]), round(sum(col[5]) / len(rows), 1)], "samples": len(rows)}


def _smi_index() -> str:
    """nvidia-smi's id of the GPU this process uses: CUDA_VISIBLE_DEVICES' entry when set (an index or a UUID)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return visible[current] if current < len(visible) else str(current)


def dynamo_counts() -> dict[str, int]:
    """Running totals: frames Dynamo was asked to convert (failed ones too), FX graphs it compiled, graphs
    Inductor compiled for CUDA graphs (mode="reduce-overhead") but then ran without them (cudagraph_skips), and
    CUDA graphs its trees recorded (cudagraph_recordings; a recording inside a timed call costs a capture)."""
    from torch._dynamo.utils import counters

    return {"frames": int(counters["frames"]["total"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
            **cudagraph_tree_counts()}


def cudagraph_tree_counts() -> dict[str, int]:
    """Running totals of the current CUDA device's CUDA-graph tree (Inductor's, mode="reduce-overhead"):
    graphs recorded, of which re-recordings of a function already recorded, and warm-up runs. Read from the
    tree manager's counters (private; {} where this torch lacks them, or without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        if manager is None:
            return {"cudagraph_recordings": 0, "cudagraph_rerecords": 0, "cudagraph_warmups": 0}
        # itertools.count's repr carries its next value: count(n) / count(-n, -1)
        recorded = int(re.search(r"-?\d+", repr(manager.graph_counter)).group())
        warmups = -int(re.search(r"-?\d+", repr(manager.warmup_node_counter)).group()) - 1
        return {"cudagraph_recordings": recorded, "cudagraph_rerecords": int(manager.debug_fail_counter),
                "cudagraph_warmups": warmups}
    except (ImportError, AttributeError, TypeError, ValueError):
        return {}


def _counted(fn, device: str) -> tuple[float, dict[str, int]]:
    """(seconds, {"frames": n, "graphs": n} converted/compiled during the call)."""
    before = dynamo_counts()
    t = _sync_time(fn, device)
    after = dynamo_counts()
    return t, {k: after[k] - before[k] for k in after}


def _compile_decode_on_cpu(model) -> None:
    """transformers compiles the static cache's decode steps only on accelerators unless told otherwise."""
    from transformers import CompileConfig

    gc_ = model.generation_config
    if gc_.compile_config is None:
        gc_.compile_config = CompileConfig()  # what transformers uses by default: Inductor, reduce-overhead
    gc_.compile_config._compile_all_devices = True  # survives the deep copy generate makes of the config


def prepare(system: str, model, device: str = "cuda", inner: str = "inductor"):
    import kernopt

    if system == "eager":
        return model
    if system == "hf_static_inductor":
        model.generation_config.cache_implementation = "static"
    else:
        if system not in SYSTEMS + EXTRA_SYSTEMS:
            raise KeyError(system)
        model = kernopt.optimize(model, quantize=quantize_of(system), cache="static", inner=inner)
        if system == "kernopt_sync":
            model.generate = type(model).generate.__get__(model)  # transformers' loop, without the deferral
    if device != "cuda":
        _compile_decode_on_cpu(model)
    return model


@contextlib.contextmanager
def system_env(system: str):
    """The experiment switches of SYSTEM_ENV set for one system's run, the others unset; the caller's restored."""
    unset = {name: None for env in SYSTEM_ENV.values() for name in env}
    from kernopt.benchmark import env_vars

    with env_vars(**{**unset, **SYSTEM_ENV.get(system, {})}):
        yield


def _check_decode_logits(model, prompt_ids, new: int, out: dict, problems: list) -> None:
    """The decode steps' logits, as the timed `generate` computes them (compiled step, CUDA graphs, the decode
    kernels), against the system's plain-torch reference on the same tokens: one eager forward over the
    generated sequence (teacher forcing, so no diverging trajectories). The prefill check above never runs the
    M=1 kernels (the int4 / fp8 GEMVs, decode attention). Sets ``decode_cosine_vs_reference``; below the
    prefill check's floor it is an error of the system, and a failure to run the check is a warning."""
    from kernopt.hf import plain_torch_eager

    try:
        res = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, output_logits=True, return_dict_in_generate=True)
        # logits[i] picked new token i; for i >= 1 a decode step computed it, at position prompt + i - 1
        got = torch.stack(res.logits[1:], dim=1)[:1].float()
        p = prompt_ids.shape[1]
        with plain_torch_eager(model):
            ref = model(res.sequences[:1, :p + new - 1], use_cache=False).logits[:, p:].float()
        cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
    except Exception as e:  # the check is a check: the timings above stand
        out.setdefault("warnings", []).append(f"decode logits check did not run: {type(e).__name__}: {e}")
        return
    out["decode_cosine_vs_reference"] = cos
    floor = out.get("cosine_floor", MIN_COSINE)
    if cos < floor:
        problems.append(f"decode-step logits cosine {cos:.4f} vs the eager reference, below {floor:.4f}")


def run_system(system: str, shape: str, batch_sizes, prompt: int, new: int, prefill_len: int, ref_logits,
               device: str = "cuda", inner: str = "inductor"):
    # Each system starts from an empty Dynamo cache: HF's forward is one code object for all systems, and
    # earlier systems' compiles must not count against this one's recompile limit.
    torch._dynamo.reset()
    model = build(shape, device)
    kernopt_system = system.startswith("kernopt")
    out: dict = {"dynamo": {}}
    problems: list[str] = []
    vocab = model.config.vocab_size
    lo, hi = min(100, vocab // 4), min(20000, vocab)
    ids = torch.randint(lo, hi, (1, prefill_len), device=device)
    float_logits = None
    if system in QUANTIZED:  # the unquantized model's logits: the quantization's own error, for the check
        with torch.no_grad():
            float_logits = model(ids).logits[0, -64:].float()
    model = prepare(system, model, device, inner)
    with torch.no_grad():
        if system == "eager":
            fwd = model.forward
        elif system == "hf_static_inductor":
            fwd = torch.compile(model.forward, backend="inductor")
        else:
            fwd = torch.compile(model.forward, backend="kernopt", options={"inner": inner})
        from kernopt.hf import plain_torch_eager

        with plain_torch_eager(model):  # eager, quantized linears on their dequantize / quantize references
            reference = model(ids).logits[0, -64:].float()  # the plain-torch reference of this system
        before = dynamo_counts()
        logits = fwd(ids).logits[0, -64:].float()
        prefill_graphs = dynamo_counts()["graphs"] - before["graphs"]
        if kernopt_system:
            cos = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0).item()
            out["cosine_vs_reference"] = cos
            floor = MIN_COSINE
            if float_logits is not None:
                quant = torch.nn.functional.cosine_similarity(reference.flatten(), float_logits.flatten(), dim=0).item()
                out["reference_cosine_vs_float"] = quant
                floor = min(MIN_COSINE, quant)
            out["cosine_floor"] = floor
            if cos < floor:
                problems.append(f"prefill logits cosine {cos:.4f} vs the eager reference, below {floor:.4f} "
                                + ("(the quantization's own cosine to the float model)" if floor < MIN_COSINE
                                   else ""))
            if ref_logits is not None:
                out["cosine_vs_bf16"] = torch.nn.functional.cosine_similarity(
                    logits.flatten(), ref_logits.flatten(), dim=0).item()
        for _ in range(2):
            fwd(ids)
        reps = [_counted(lambda: fwd(ids), device) for _ in range(5)]
        out["prefill_ms"] = sorted(t for t, _ in reps)[2] * 1e3
        out["dynamo"]["prefill_ms"] = {"compile_graphs": prefill_graphs,
                                       "timed_graphs": [c["graphs"] for _, c in reps],
                                       "timed_frames": [c["frames"] for _, c in reps]}
        for bs in batch_sizes:
            prompt_ids = torch.randint(lo, hi, (bs, prompt), device=device)
            gen = lambda: model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                         max_new_tokens=new, min_new_tokens=new)
            first, first_counts = _counted(gen, device)
            if bs == batch_sizes[0]:
                out["first_call_s"] = first
            # Untimed: CUDA graph trees warm a path up on its first run and record it on its second, and the prompt
            # forward's graph runs once per call, so the first timed call recorded it (llama_int4_b4: [1, 0, 0, 0, 0])
            _counted(gen, device)
            with (GpuSampler() if device == "cuda" else contextlib.nullcontext()) as sampler:
                timed = [_counted(gen, device) for _ in range(DECODE_TIMED_CALLS)]  # after the first: compiled
            if sampler is not None:
                out.setdefault("gpu", {})[f"decode_bs{bs}"] = sampler.summary()
            t = min(s for s, _ in timed)
            out[f"decode_bs{bs}"] = bs * new / t
            counts = {"first_call_graphs": first_counts["graphs"], "first_call_frames": first_counts["frames"],
                      "first_call_cudagraph_skips": first_counts["cudagraph_skips"],
                      "timed_graphs": [c["graphs"] for _, c in timed],
                      "timed_frames": [c["frames"] for _, c in timed],
                      "timed_cudagraph_recordings": [c.get("cudagraph_recordings") for _, c in timed],
                      "timed_cudagraph_rerecords": [c.get("cudagraph_rerecords") for _, c in timed],
                      "timed_s": [round(s, 4) for s, _ in timed]}
            out["dynamo"][f"decode_bs{bs}"] = counts
            if device == "cuda" and system != "eager" and first_counts["cudagraph_skips"]:
                # The decode step runs without CUDA graphs: launch-bound; Inductor's perf hints log say why.
                out.setdefault("warnings", []).append(
                    f"decode_bs{bs}: {first_counts['cudagraph_skips']} graph(s) compiled for CUDA graphs ran without "
                    "them (TORCH_LOGS=perf_hints says why)")
            if bs == batch_sizes[0] and kernopt_system and new > 1:
                _check_decode_logits(model, prompt_ids, new, out, problems)
            if bs == batch_sizes[0]:
                out["dynamo"]["first_call_s"] = {"graphs": first_counts["graphs"], "frames": first_counts["frames"]}
                # First call minus the fastest compiled call: what compiling (and one-time warm-up) cost.
                out["first_call_overhead_s"] = max(0.0, first - t)
        # Where a generate call's time goes: the same call with one new token (the prompt's forward, which
        # transformers runs uncompiled under the static cache, plus one sampling step), and the rest per decode
        # step. Run last: its shorter static cache may be re-allocated by later calls.
        bs = batch_sizes[0]
        prompt_ids = torch.randint(lo, hi, (bs, prompt), device=device)
        first_token = lambda: model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),  # noqa: E731
                                             do_sample=False, max_new_tokens=1, min_new_tokens=1)
        ones = [_counted(first_token, device) for _ in range(3)]
        t1 = min(t for t, _ in ones)
        out[f"generate_1_token_ms_bs{bs}"] = t1 * 1e3
        out["dynamo"][f"generate_1_token_bs{bs}"] = {
            "timed_graphs": [c["graphs"] for _, c in ones], "timed_frames": [c["frames"] for _, c in ones],
            "timed_cudagraph_recordings": [c.get("cudagraph_recordings") for _, c in ones]}
        if new > 1:
            out[f"decode_step_ms_bs{bs}"] = max(0.0, bs * new / out[f"decode_bs{bs}"] - t1) / (new - 1) * 1e3
    for case, c in out["dynamo"].items():
        if any(c.get("timed_cudagraph_recordings") or ()):
            out.setdefault("warnings", []).append(
                f"{case}: CUDA graphs recorded inside timed calls ({c['timed_cudagraph_recordings']} per call)")
        if sum(c.get("timed_graphs", [])) or sum(c.get("timed_frames", [])):
            msg = (f"{case}: timed calls recompiled (Dynamo graphs {c['timed_graphs']}, "
                   f"frames {c['timed_frames']} per call)")
            out.setdefault("warnings", []).append(msg)
            if kernopt_system:
                problems.append(msg)
    if problems:
        out["error"] = "; ".join(problems)
    model = fwd = gen = None  # noqa: F841  (the closures above hold them: free the model before the next system)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out, (reference if system == "eager" else None)


def cache_state(device: str) -> dict:
    """What a first call starts from: kernopt's tuned configs here, first-use autotuning, Inductor's cache.

    Recorded once, before any system compiles (later systems of one run may find Inductor's and Triton's
    on-disk caches warmed by earlier ones). For "first call with a warm tuned cache" run `kernopt tune` for the
    shape first; for a cold compiler, point TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR at empty directories.
    """
    from kernopt import workload

    state: dict = {"deferred_stop_check": os.environ.get("KERNOPT_DEFER_STOP_CHECK", "1") != "0",
                   "autotune_on_first_use": workload.autotune_enabled(),
                   "tuned_cache_disabled": os.environ.get("KERNOPT_NO_CACHE") == "1"}
    if device == "cuda":
        cache = workload.ConfigCache()
        state["tuned_config_file"] = str(cache.path)
        state["tuned_configs"] = len(cache.entries())
    else:
        state["tuned_configs"] = 0  # no tuning off the GPU: ops run their references
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        inductor_dir = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())
        state["inductor_cache_dir"] = str(inductor_dir)
        state["inductor_cache_warm"] = inductor_dir.is_dir() and any(inductor_dir.iterdir())
    except Exception as e:  # a private torch helper: its absence must not cost the run
        state["inductor_cache_dir"] = f"unknown ({type(e).__name__})"
    state["triton_cache_dir"] = os.environ.get("TRITON_CACHE_DIR", "default (~/.triton/cache)")
    return state


def _suite(all_results: dict, batch_sizes, prefill: int, device: str = "cuda", start_state=None):
    import transformers

    from kernopt.benchmark import Suite

    suite = Suite("llama")
    if device != "cuda":  # Suite names the GPU if there is one; this run's numbers are from the CPU
        suite.device = suite.header["device"] = "cpu"
        suite.header["cpu"] = platform.processor() or platform.machine()
        suite.header["cpu_threads"] = torch.get_num_threads()
    suite.header["dtype"] = str(dtype_for(device)).replace("torch.", "")
    suite.header["transformers"] = transformers.__version__
    from kernopt.hf import compile_prefill_enabled, prefill_cuda_graphs_enabled

    # kernopt's switches that change what the kernopt systems run (environment variables)
    suite.header["kernopt_env"] = {k: os.environ[k] for k in ("KERNOPT_COMPILE_PREFILL", "KERNOPT_INT4_GROUP",
                                                              "KERNOPT_INT4_FLOAT_X", "KERNOPT_DEFER_STOP_CHECK",
                                                              "KERNOPT_AUTOTUNE", "KERNOPT_PREFILL_CUDA_GRAPHS",
                                                              "KERNOPT_INT4_SWIGLU", "KERNOPT_INDUCTOR_COMBO",
                                                              "KERNOPT_DECODE_APPEND", "KERNOPT_INT4_GEMV",
                                                              "KERNOPT_PDL", "KERNOPT_FP8_GROUP", "KERNOPT_FP8_GEMV",
                                                              "KERNOPT_FP8_PROMPT")
                                   if k in os.environ}
    suite.header["compile_prefill"] = compile_prefill_enabled()
    suite.header["prefill_cuda_graphs"] = prefill_cuda_graphs_enabled()
    for shape, results in all_results.items():
        def row(case, key, metric, hib, **more):
            vals = {s: r[key] for s, r in results.items() if key in r and not (s.startswith("kernopt") and "error" in r)}
            system_errors = {s: r["error"] for s, r in results.items() if "error" in r}
            errs = "; ".join(f"{s}: {e}" for s, e in system_errors.items())
            cos = {s: round(r["cosine_vs_reference"], 5) for s, r in results.items() if "cosine_vs_reference" in r}
            qerr = {s: round(r["cosine_vs_bf16"], 5) for s, r in results.items() if "cosine_vs_bf16" in r}
            qref = {s: round(r["reference_cosine_vs_float"], 5) for s, r in results.items()
                    if "reference_cosine_vs_float" in r}
            dcos = {s: round(r["decode_cosine_vs_reference"], 5) for s, r in results.items()
                    if "decode_cosine_vs_reference" in r}
            dyn = {s: r["dynamo"][key] for s, r in results.items() if key in r.get("dynamo", {})}
            gpu = {s: r["gpu"][key] for s, r in results.items() if key in r.get("gpu", {})}
            warns = {s: r["warnings"] for s, r in results.items() if r.get("warnings")}
            if vals or errs:  # a case whose every system failed still says why
                extra = {"errors": errs, "system_errors": system_errors} if errs else {}
                if cos:
                    extra["prefill_logits_cosine_vs_reference"] = cos
                    extra["prefill_logits_cosine_vs_bf16"] = qerr
                    extra["reference_logits_cosine_vs_float"] = qref
                if dcos:
                    extra["decode_logits_cosine_vs_reference"] = dcos
                extra["dynamo"] = dyn
                if gpu:
                    extra["gpu_during_timed_calls"] = gpu
                if warns:
                    extra["warnings"] = warns
                extra.update(more)
                suite.add(case, metric, hib, vals, **extra)
        for bs in batch_sizes:
            row(f"{shape} decode bs{bs}", f"decode_bs{bs}", "tok/s", True)
        bs = batch_sizes[0]
        row(f"{shape} generate 1 token bs{bs}", f"generate_1_token_ms_bs{bs}", "ms", False)
        row(f"{shape} decode step bs{bs}", f"decode_step_ms_bs{bs}", "ms", False)
        row(f"{shape} prefill b1 s{prefill}", "prefill_ms", "ms", False)
        overhead = {s: round(r["first_call_overhead_s"], 4) for s, r in results.items() if "first_call_overhead_s" in r}
        row(f"{shape} first-call s", "first_call_s", "s", False, first_call_overhead_s=overhead,
            **({"cache_state": start_state} if start_state else {}))
    return suite


def output_dir(device: str, out) -> Path:
    """Where the JSON goes: --out; else benchmarks/results on the GPU, a fresh temporary directory on CPU."""
    from kernopt.benchmark import RESULTS_DIR

    if device == "cuda":
        return Path(out) if out else RESULTS_DIR
    if out is None:
        return Path(tempfile.mkdtemp(prefix="kernopt-llama-cpu-"))
    if Path(out).resolve() == RESULTS_DIR.resolve():
        raise SystemExit(f"kernopt bench llama: CPU smoke-test numbers do not go to {RESULTS_DIR}; "
                         "pick another --out")
    return Path(out)


def _compile_caches(root, name: str):
    """With `root` (--cold-compile-caches): fresh Inductor and Triton cache directories for one system of one
    shape, so its first call compiles from nothing rather than from what an earlier run or system left on disk.
    (Kernels compiled earlier in this process stay compiled in memory: the first system of a kind is the cold
    number.)"""
    if root is None:
        return contextlib.nullcontext()
    from kernopt.benchmark import env_vars

    return env_vars(TORCHINDUCTOR_CACHE_DIR=str(root / name / "inductor"), TRITON_CACHE_DIR=str(root / name / "triton"))


@contextlib.contextmanager
def _cpu_references(device: str):
    """On CPU every kernopt op runs its plain-torch reference (the Triton interpreter would take minutes)."""
    if device == "cuda":
        yield
        return
    from kernopt.benchmark import env_vars

    with env_vars(KERNOPT_CPU="reference"):
        yield


def _per_system(value) -> bool:
    """A row field that holds one entry per system (results, dynamo, cosines, ...)."""
    return isinstance(value, dict) and bool(value) and set(value) <= set(SYSTEMS + EXTRA_SYSTEMS)


def merge_earlier(suite, out: Path) -> None:
    """Fold an earlier run's JSON in `out` (same suite and device) into `suite`: its numbers for the systems this
    run did not measure in a case (no result and no error in that case's row), in the same case's row or in a row
    of its own, each marked in the row's ``from_run`` with the commit and date they came from. One file then holds
    runs split by shape or by system (a GPU command has a time limit that the whole suite exceeds), and a run cut
    short (the suite writes after every system) loses none of the earlier numbers of the systems it did not reach."""
    import json

    from kernopt.benchmark import gpu_slug

    path = Path(out) / f"{suite.suite}-{gpu_slug(suite.device)}.json"
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if earlier.get("suite") != suite.suite or earlier.get("device") != suite.device:
        return
    stamp = {"kernopt_commit": earlier.get("kernopt_commit"), "date": earlier.get("date")}
    ours = {r["case"]: r for r in suite.rows}
    kept = []
    for old in earlier.get("rows", []):
        fields = {k: v for k, v in old.items() if _per_system(v) and k != "from_run"}
        row = ours.get(old["case"])
        systems = set(row["results"]) | set(row.get("system_errors", {})) if row is not None else set()
        carried = sorted({sys_ for v in fields.values() for sys_ in v} - systems)
        if not carried:
            continue
        if row is None:
            row = {k: v for k, v in old.items() if k not in fields and k not in ("errors", "from_run")}
            row["results"] = {}
            kept.append(row)
        for k, v in fields.items():
            mine = row.setdefault(k, {})
            mine.update({sys_: v[sys_] for sys_ in carried if sys_ in v})
        # what the earlier run measured of the systems this run re-measures (the carried systems' same-run
        # baselines: a ratio across runs is not a measurement)
        same_run = {sys_: v for sys_, v in old.get("results", {}).items()
                    if sys_ in systems and sys_ not in old.get("from_run", {})}
        here = dict(stamp, same_run_results=same_run) if same_run else stamp
        row.setdefault("from_run", {}).update({sys_: old.get("from_run", {}).get(sys_, here) for sys_ in carried})
        errs = row.get("system_errors", {})
        if errs:
            row["errors"] = "; ".join(f"{sys_}: {e}" for sys_, e in errs.items())
    suite.rows[:0] = kept


def write(suite, out: Path, plot: bool = False) -> Path:
    path = suite.write(out)
    if plot:
        png = suite.plot(path.with_suffix(".png"))
        print("wrote", png if png else f"no plot ({path.with_suffix('.png').name}): matplotlib is not installed "
              "(pip install 'kernopt[plot]')")
    return path


def names(text: str) -> list[str]:
    """A list option: comma- or plus-separated ("1,16" or "1+16"; benchmarks/run_gpu.sh turns commas into
    spaces, so lists passed through it use "+")."""
    return [t for t in text.replace("+", ",").split(",") if t]


def errors(results: dict) -> list[str]:
    """Every system's error in a run's results ({shape: {system: numbers}}), as "shape system: error"."""
    return [f"{shape} {system}: {r['error']}" for shape, res in results.items() for system, r in res.items()
            if "error" in r]


def main(argv=None) -> dict:
    """Run the suite; returns {"path": the JSON's path, "results": {shape: {system: numbers}}}."""
    from kernopt.benchmark import require_cuda

    ap = argparse.ArgumentParser(description="kernopt llama suite")
    ap.add_argument("--shapes", default=None,
                    help=f"comma-separated, of {', '.join(LLAMA)} (default: 1B,8B on cuda, tiny on cpu)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--device", choices=DEVICES, default="cuda",
                    help="cpu: a smoke test of the suite (ops as references, fp32, --shapes tiny); numbers mean nothing")
    ap.add_argument("--inner", choices=["inductor", "eager"], default="inductor",
                    help="what compiles the rest of the kernopt systems' graphs (the baselines keep Inductor)")
    ap.add_argument("--cold-compile-caches", action="store_true",
                    help="fresh Inductor/Triton cache directories per system: first-call s is a cold compile")
    ap.add_argument("--out", default=None, help="directory for the JSON (CPU runs: a temporary one by default)")
    ap.add_argument("--merge", action="store_true",
                    help="keep an earlier run's numbers (same device, same --out) for the systems this run does not "
                         "measure: one JSON from runs split by shape or system")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1B (tiny on cpu), bs1, 32 new tokens")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        require_cuda("kernopt bench llama")
    if args.shapes is None:
        args.shapes = "1B,8B" if args.device == "cuda" else "tiny"
    if args.quick:
        args.shapes, args.batch_sizes, args.new = ("1B" if args.device == "cuda" else "tiny"), "1", 32
    shapes = names(args.shapes)
    unknown = [s for s in shapes if s not in LLAMA]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; valid: {', '.join(LLAMA)}")
    systems = names(args.systems)
    unknown = [s for s in systems if s not in SYSTEMS + EXTRA_SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; valid: {', '.join(SYSTEMS + EXTRA_SYSTEMS)}")
    batch_sizes = [int(b) for b in names(args.batch_sizes)]
    out_dir = output_dir(args.device, args.out)
    start_state = cache_state(args.device)
    cold_root = Path(tempfile.mkdtemp(prefix="kernopt-cold-caches-")) if args.cold_compile_caches else None
    start_state["compile_caches"] = "fresh per system" if cold_root else "as found"

    def suite_now():
        suite = _suite(all_results, batch_sizes, args.prefill, args.device, start_state)
        if args.merge:
            merge_earlier(suite, out_dir)
        return suite

    all_results: dict[str, dict] = {}
    with _cpu_references(args.device), contextlib.ExitStack() as cleanup:
        if cold_root is not None:
            cleanup.callback(shutil.rmtree, cold_root, ignore_errors=True)
        for shape in shapes:
            results, ref = all_results.setdefault(shape, {}), None
            for system in systems:
                print(f"[llama] {shape} {system} ...", flush=True)
                try:
                    with _compile_caches(cold_root, f"{shape}-{system}"), system_env(system):
                        res, logits = run_system(system, shape, batch_sizes, args.prompt, args.new, args.prefill, ref,
                                                 device=args.device, inner=args.inner)
                except Exception as e:  # one system failing must not lose the others' numbers
                    res, logits = {"error": f"{type(e).__name__}: {e}"[:400]}, None
                if logits is not None:
                    ref = logits
                results[system] = res
                print(f"[llama] {shape} {system}: {res}", flush=True)
                # After every system: a run cut short keeps what it measured.
                write(suite_now(), out_dir)
    suite = suite_now()
    print(suite.table(baseline="hf_static_inductor"))
    path = write(suite, out_dir, plot=not args.no_plot)
    print("wrote", path)
    return {"path": path, "results": all_results}


if __name__ == "__main__":
    raise SystemExit(1 if errors(main()["results"]) else 0)
