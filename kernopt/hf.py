"""`kernopt.optimize(model, quantize=None | "int4" | "fp8")`: the one-line Hugging Face entry.

    model = kernopt.optimize(AutoModelForCausalLM.from_config(cfg).cuda().bfloat16(), quantize="int4")
    model.generate(input_ids, max_new_tokens=128)

What it does, in order: quantize the linear layers (skipping `skip`, lm_head by default); route attention
through kernopt (transformers' AttentionInterface, `kernopt/hf_attention.py`); pick the KV cache; compile.
Under ``cache="static"`` transformers compiles only the decode step and runs the prompt's forward uncompiled;
quantized linears run their fused ops in those eager calls on a GPU (`kernopt.ops.eager_kernel`). On a GPU
`optimize()` compiles that forward too (`_compile_prefill`; KERNOPT_COMPILE_PREFILL=0 leaves it eager), and
against a static cache it replays as CUDA graphs (KERNOPT_PREFILL_CUDA_GRAPHS=0 keeps it without graphs).

Two caches:
- ``cache="paged"`` (default): a `PagedKVCache` (pages allocated per sequence as it grows, reused across
  generate calls) that `generate` gets unless the caller passes its own; prefill runs the FlashAttention
  kernel, decode the paged split-KV kernel; `forward` is compiled with the kernopt backend.
- ``cache="static"``: HF's static cache, with decode steps compiled by the kernopt backend in
  ``mode="reduce-overhead"`` through transformers' own CompileConfig, so each decode step replays as a
  CUDA graph (Inductor's CUDA-graph trees; `generate` copies each step's last-token logits before the next
  step, and the static cache's tensors are graph inputs updated in place, so no step reads an output that a
  later replay overwrote — the failure a plain `torch.compile(mode="reduce-overhead")` of `forward` hits
  inside `generate`). The paged cache's page bookkeeping runs on the host, so it is not captured.

Either way `generate` runs with transformers' deferred stop check on CUDA (`deferred_stop_checks`): the host
queues step i+1 while the GPU runs step i instead of waiting for it every token; the tokens are the same.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from typing import Iterable, Optional

import torch

from kernopt import workload

QUANTIZE = (None, "int4", "fp8")
CACHES = ("paged", "static")


def optimize(model, quantize: Optional[str] = None, group_size: int = 128, scenario: str = "auto",
             skip: Iterable[str] = ("lm_head",), cache: str = "paged", compile: bool = True,
             inner: str = "inductor"):
    """Quantize, install kernopt attention and its KV cache, and compile `model` (in place; returned)."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}; valid: None, 'int4', 'fp8'")
    if cache not in CACHES:
        raise ValueError(f"cache={cache!r}; valid: {', '.join(map(repr, CACHES))}")
    if scenario != "auto" and scenario not in workload.SCENARIOS:
        raise ValueError(f"scenario={scenario!r}; valid: 'auto', {', '.join(map(repr, workload.SCENARIOS))}")
    int4_groups: list[list[str]] = []
    fp8_groups: list[list[str]] = []
    if quantize == "int4":
        from kernopt import int4

        if group_size not in int4.GROUP_SIZES:
            raise ValueError(f"group_size={group_size}; valid: {', '.join(map(str, int4.GROUP_SIZES))}")
        # Linears that read one input (q/k/v, gate/up) share buffers, so the int4 pass's grouped op runs them
        # in one launch (kernopt.ops.int4_linear_group); found on the float model, before quantizing.
        int4_groups = int4.quantize_int4_grouped_(model, group_size=group_size, skip=skip, run=_tiny_forward(model))
    elif quantize == "fp8":
        from kernopt.fp8 import quantize_fp8_grouped_

        # as int4: q/k/v and gate/up in shared buffers, one launch each (kernopt.ops.fp8_linear_prequant_group)
        fp8_groups = quantize_fp8_grouped_(model, skip=skip, run=_tiny_forward(model))

    if compile:
        # Eager calls (transformers' uncompiled prefill under cache="static") run the fused ops on a GPU too.
        for m in model.modules():
            if hasattr(type(m), "kernel_in_eager"):
                m.kernel_in_eager = True
    options = {"scenario": scenario, "inner": inner}
    if cache == "static":
        from transformers import CompileConfig

        gc = model.generation_config
        gc.cache_implementation = "static"
        # The backend by name, not a callable: transformers deep-copies the config for every generate call,
        # and a copied callable fails Dynamo's backend-match guard, so every call would recompile.
        # torch.compile takes mode= or options=, not both: the CUDA-graph mode travels inside our options.
        gc.compile_config = CompileConfig(backend="kernopt", options={**options, "mode": "reduce-overhead"},
                                          mode=None, fullgraph=False)
        _reuse_static_cache(model)
        if compile and compile_prefill_enabled() and _device_of(model).type in PREFILL_COMPILE_DEVICES:
            _compile_prefill(model, options)
        _defer_stop_checks_in_generate(model)
        model._kernopt = {"quantize": quantize, "cache": cache, "scenario": scenario, "int4_groups": int4_groups,
                          "fp8_groups": fp8_groups}
        return model

    from kernopt import hf_attention

    hf_attention.install(model)
    if compile:
        model.forward = torch.compile(model.forward, backend="kernopt", options=options)
    _give_generate_a_paged_cache(model, hf_attention)
    _defer_stop_checks_in_generate(model)
    model._kernopt = {"quantize": quantize, "cache": cache, "scenario": scenario, "int4_groups": int4_groups,
                          "fp8_groups": fp8_groups}
    return model


# Devices where optimize(cache="static") may also compile the prompt's forward (transformers compiles decode
# steps only on GPUs too, unless told otherwise; tests add "cpu"). KERNOPT_COMPILE_PREFILL=0 switches it off.
PREFILL_COMPILE_DEVICES = ("cuda",)


def compile_prefill_enabled() -> bool:
    return os.environ.get("KERNOPT_COMPILE_PREFILL", "1") != "0"


def _device_of(model) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _compile_prefill(model, options: dict) -> None:
    """Eager calls of `model.forward` (the prompt's forward) run a kernopt-compiled forward: replayed as CUDA
    graphs (one per prompt length) against a static cache (`_static_cache_ready`), without graphs otherwise;
    traced calls (transformers' compiled decode step) trace the eager forward.

    Why: under ``cache="static"`` transformers compiles only the decode step (its CompileConfig) and runs the
    prompt's forward through ``model(...)`` uncompiled: every op from Python, each quantized linear a separate
    launch with its Python around it. On the H200 (llama suite, 8B, prompt 128) that cost 138 ms per int4
    generate call and 145 ms for fp8, against 28.5 ms for HF static + Inductor's bf16 eager prompt (9112e97);
    compiled, 48 / 62 / 21.6 (kernopt bf16) ms (7dec55f).

    The dispatch matters: 7dec55f replaced `forward` by the compiled function itself, and transformers'
    compiled decode call, meeting it while tracing, ran the decode step through that inner compiled forward
    instead: no CUDA graphs, 36-49 ms per step instead of 3.8-5.3. Here `torch.compiler.is_compiling()` sends a
    traced call to the eager forward, so the decode step's graph is what it was without this, once the static
    cache's tensors are marked fixed-address (_mark_static_cache_addresses). Measured on the H200 (llama suite,
    8B bs1, prompt 128, 128 new, adcb399, benchmarks/results/llama-h200.json): decode steps 5.03 (bf16) / 3.64
    (int4) ms with CUDA graphs, 194.4 / 251.7 tok/s against 158.9 / 207.1 with the prompt eager (ef7abc6 /
    9112e97).
    KERNOPT_COMPILE_PREFILL=0 leaves the prompt forward eager. `plain_torch_eager` restores the eager forward
    inside its block."""
    eager = model.forward
    model._kernopt_eager_forward = eager
    model._kernopt_prompt_forward = torch.compile(eager, backend="kernopt", options=options)
    model._kernopt_prompt_graphed = None
    if prefill_cuda_graphs_enabled() and options.get("mode") in (None, "default"):
        model._kernopt_prompt_graphed = torch.compile(eager, backend="kernopt",
                                                      options={**options, "mode": "reduce-overhead"})

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        if torch.compiler.is_compiling():
            return eager(*args, **kwargs)
        cache = kwargs.get("past_key_values")
        # initialized ahead either way: one compiled graph whether or not a call meets a fresh cache
        ready = _static_cache_ready(model, cache, args, kwargs)
        if model._kernopt_prompt_graphed is not None and ready:
            return _outputs_copied(model._kernopt_prompt_graphed(*args, **kwargs))
        out = model._kernopt_prompt_forward(*args, **kwargs)
        _mark_static_cache_addresses(cache)
        return out

    model.forward = forward


def prefill_cuda_graphs_enabled() -> bool:
    """Whether `optimize(cache="static")` replays the compiled prompt forward as CUDA graphs when it runs
    against a static cache (on by default; KERNOPT_PREFILL_CUDA_GRAPHS=0 keeps it without graphs)."""
    return os.environ.get("KERNOPT_PREFILL_CUDA_GRAPHS", "1") != "0"


def _static_cache_ready(model, cache, args, kwargs) -> bool:
    """True when `cache` is a static cache whose tensors all exist at fixed, marked addresses, so the prompt
    forward can run as a CUDA graph that updates them in place (initialized here, before the call, where the
    model says how: transformers' own `_get_static_cache_init_shape`, as its chunked prefill does).

    Why graphs for the prompt: compiled without them, each kernopt op's Python runs on the critical path
    (a 128-token 8B prompt: ~9 ms of GPU work in a 35-56 ms call, benchmarks/results/profiles). With them, the
    llama suite's int4 generate-1-token call took 17.05 ms against 43.91 without (one run, 747aee5,
    sweeps/prompt_graphs/llama-h200-747aee5.json), and 15.3-15.7 ms in the three runs after. A cache
    allocated inside the captured forward would live in the CUDA-graph pool and be overwritten by the next
    replay, hence the early initialization; anything else (no cache, a dynamic cache, a model the cache
    cannot be initialized for) runs the compiled forward without graphs."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(getattr(layer, "is_compileable", False) for layer in layers):
        return False
    if not all(getattr(layer, "is_initialized", False) for layer in layers):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        shape = getattr(model, "_get_static_cache_init_shape", lambda: None)()
        if ids is None or shape is None or not hasattr(cache, "early_initialization"):
            return False
        try:
            cache.early_initialization(batch_size=ids.shape[0], num_heads=shape[0], head_dim=shape[1],
                                       dtype=model.dtype, device=_device_of(model))
        except (ValueError, TypeError, AttributeError, RuntimeError):
            return False
    return all(getattr(layer, "is_initialized", False)
               and all(hasattr(getattr(layer, name, None), "_dynamo_static_input_type") for name in ("keys", "values"))
               for layer in layers)


def _outputs_copied(out):
    """The graphed forward's tensors copied out of the CUDA-graph pool (the next replay overwrites them): a
    caller may keep them (generate keeps only copies of the last position's logits; a small copy either way)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)) and not hasattr(out, "keys"):
        items = [_outputs_copied(o) for o in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    if hasattr(out, "keys"):  # a ModelOutput (an OrderedDict whose fields are also attributes)
        for k in list(out.keys()):
            v = out[k]
            if isinstance(v, (torch.Tensor, tuple, list)):
                out[k] = _outputs_copied(v)
        return out
    return out


def _reuse_static_cache(model) -> None:
    """`generate` under ``cache="static"`` reuses one static cache (reset, as transformers' own generate did before
    v5) while the batch size and length it needs stay the same, instead of allocating a new one every call.

    Why: the decode step's CUDA graphs (and the prompt's, `_static_cache_ready`) read the cache's tensors at the
    addresses they were recorded with. transformers 5 allocates a fresh `StaticCache` per call; when the caching
    allocator hands back other addresses, Inductor's CUDA-graph trees re-record every graph that reads them (a
    capture per call, and one more recorded graph held each time; re-recordings for moved static inputs do not
    count towards its limit). On the H200 at 747aee5 (benchmarks/prompt_graph_probe.py, 1B int4, in
    benchmarks/results/sweeps/prompt_graphs) the second generate call re-recorded both graphs ("static input data
    pointer changed"); the 8B llama suite's int4 system took 491 ms per 128-token call there (sweeps/prompt_graphs)
    and 402 / 386 ms with the reuse (2293615 / adfb41e), its timed calls recording only the prompt graph's first
    recording. HF static + Inductor, without it, re-records its decode graph in every timed call.
    Like transformers' caches before v5, the cache a call returns (``return_dict_in_generate``) is the one the next
    call with the same shape resets. A cache the caller passes is left alone (transformers never builds one then)."""
    original = getattr(model, "_prepare_static_cache", None)
    if original is None:  # another transformers: its own cache handling
        return
    state: dict = {}

    signature = inspect.signature(original)

    @functools.wraps(original)
    def _prepare_static_cache(*args, **kwargs):
        a = signature.bind(*args, **kwargs).arguments
        # transformers sizes the cache for the longest call so far (_previous_max_cache_length): the same here
        length = max(a["max_cache_len"], getattr(model, "_previous_max_cache_length", -1))
        key = (a.get("cache_implementation"), a["batch_size"], length, a.get("prefill_chunk_size"), model.dtype,
               _device_of(model))
        cache = state.get("cache")
        if cache is not None and state.get("key") == key and not model.config.is_encoder_decoder:
            cache.reset()
            return cache
        cache = original(*args, **kwargs)
        state.update(cache=cache, key=key)
        return cache

    model._prepare_static_cache = _prepare_static_cache


def _mark_static_cache_addresses(cache) -> None:
    """Mark a static cache's tensors as fixed-address graph inputs after the compiled prompt forward.

    transformers' static layers allocate keys / values / cumulative_length on their first `update` and mark
    them with `torch._dynamo.mark_static_address` there, except while Dynamo traces (is_torchdynamo_compiling):
    when the prompt forward is compiled, the allocation happens inside the traced graph and the marks are
    skipped. The decode step's CUDA graphs then meet mutated inputs that are not static and run without
    graphs: 36-45 ms per 8B decode step instead of 3.8-5.3 on the H200 (llama suite at 0744510 with
    KERNOPT_COMPILE_PREFILL=1, the "ran without CUDA graphs" warning). Marking is idempotent, done eagerly."""
    for layer in getattr(cache, "layers", None) or ():
        if not getattr(layer, "is_compileable", False) or not getattr(layer, "is_initialized", False):
            continue
        for name in ("keys", "values", "cumulative_length"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and not hasattr(t, "_dynamo_static_input_type"):
                torch._dynamo.mark_static_address(t)


def _tiny_forward(model):
    """A callable running `model` once on a two-token input (to trace which linears share an input), or None
    when the model's main input is not token ids."""
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        return None
    device = _device_of(model)
    return lambda: model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=False)


@contextlib.contextmanager
def plain_torch_eager(model):
    """Within the block, the quantized linears that `optimize()` switched to their fused ops in eager calls
    run their plain-torch references again, and a forward that `optimize()` compiled (the static cache's
    prompt forward on a GPU) runs uncompiled: what the llama suite compares the compiled model with."""
    switched = [m for m in model.modules() if getattr(m, "kernel_in_eager", False)]
    compiled = model.__dict__.get("forward") if "_kernopt_eager_forward" in model.__dict__ else None
    for m in switched:
        m.kernel_in_eager = False
    if compiled is not None:  # the compiled prompt forward (_compile_prefill): the eager one within the block
        model.forward = model._kernopt_eager_forward
    try:
        yield model
    finally:
        for m in switched:
            m.kernel_in_eager = True
        if compiled is not None:
            model.forward = compiled


# Devices whose decode loop gets transformers' deferred stop check (see _defer_stop_checks_in_generate).
DEFER_STOP_CHECK_DEVICES = ("cuda",)
_defer_lock = threading.Lock()
_defer_depth = 0


@contextlib.contextmanager
def deferred_stop_checks():
    """Within the block, transformers' greedy/sampling loop checks "all sequences finished?" one step late on
    the devices in DEFER_STOP_CHECK_DEVICES, as it does on its own only on Apple's mps.

    transformers' `_sample` ends every step with ``unfinished_sequences.max() == 0`` read on the host: the host
    waits for the GPU each step, so its per-step Python (input preparation, logits processors, stopping
    criteria, the CUDA-graph replay call) never overlaps the GPU's work and adds to every token. Its
    `DeferredStopCheck` copies the flag asynchronously and reads it one step later (the max-length stop stays
    on the host, exact); when an EOS stop is seen late, transformers undoes the one extra step itself
    (`finish` -> `_undo_generation_steps`), so the returned tokens are the ones the synchronous loop returns.
    This turns the check on for CUDA by answering `DeferredStopCheck.is_supported` as for mps, keeping its
    other conditions (assistant models, returned caches that can't be cropped). Process-wide while any
    kernopt-optimized `generate` runs (a reference count; nested and concurrent calls are fine); a transformers
    without `DeferredStopCheck` is left as it is. ``KERNOPT_DEFER_STOP_CHECK=0`` turns it off (to measure
    what it is worth: the llama suite records the setting in each run).
    """
    global _defer_depth
    if os.environ.get("KERNOPT_DEFER_STOP_CHECK", "1") == "0":  # off: transformers' own per-step check
        yield False
        return
    try:
        from transformers.generation import utils as gen_utils

        cls = gen_utils.DeferredStopCheck
        original = cls.__dict__["is_supported"]
    except (ImportError, AttributeError, KeyError):
        yield False
        return

    def is_supported(device, cache, cache_is_returned, is_assistant=False):
        if torch.device(device).type in DEFER_STOP_CHECK_DEVICES:
            device = torch.device("mps")  # the check's own conditions, as for mps
        return original.__func__(device, cache, cache_is_returned, is_assistant=is_assistant)

    with _defer_lock:
        if _defer_depth == 0:
            cls.is_supported = staticmethod(is_supported)
        _defer_depth += 1
    try:
        yield True
    finally:
        with _defer_lock:
            _defer_depth -= 1
            if _defer_depth == 0:
                cls.is_supported = original


def _defer_stop_checks_in_generate(model) -> None:
    """`model.generate` runs with `deferred_stop_checks()`: the host queues step i+1 while the GPU runs step i."""
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        with deferred_stop_checks():
            return original(*args, **kwargs)

    model.generate = generate


def _give_generate_a_paged_cache(model, hf_attention) -> None:
    """`model.generate(...)` unchanged: a PagedKVCache, reset and reused, unless the caller passes a cache."""
    original = model.generate
    key = hf_attention.cache_argument(model)
    state = {"cache": None}

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if kwargs.get(key) is None and not kwargs.get("use_cache") is False:
            if state["cache"] is None:
                state["cache"] = hf_attention.paged_cache(model)
            state["cache"].reset()
            kwargs[key] = state["cache"]
        return original(*args, **kwargs)

    model.generate = generate
