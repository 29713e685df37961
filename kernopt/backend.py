"""The torch.compile backend: `torch.compile(model, backend="kernopt", mode=..., options={...})`.

Dynamo hands us each captured FX graph (torch-level, before AOT autograd: see passes/graph.py for why).
We run the pass pipeline over it (each pass rewrites what its guard accepts and records a reason for
what it leaves alone), then give the graph to the inner compiler: Inductor by default, or eager.

Options (all optional):
    scenario  "auto" | "offline" | "server" | "single-stream" | "interactive"   (default "auto": from shapes)
    inner     "inductor" | "eager"                                                (default "inductor")
    passes    {"matmul": False, ...} to switch passes off, or ["attention", ...] to run only those
    verify    True: on the first call, also run the original graph and raise if outputs differ
              beyond dtype tolerance, naming the pass responsible
    mode      torch.compile's mode, for callers that pass options (torch.compile takes only one of the two)
`mode` is torch.compile's: None/"default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs";
it is handed to Inductor.
"""
from __future__ import annotations

import copy
import itertools
import logging
import os
import threading
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from kernopt import ops  # noqa: F401  (registers torch.ops.kernopt.*)
from kernopt import tolerance, workload
from kernopt.passes import PASS_NAMES, load
from kernopt.kernels.host import env_switch
from kernopt.passes.graph import Fallback, PassContext, Rewrite

log = logging.getLogger("kernopt")

DEFAULT_OPTIONS: dict[str, Any] = {"scenario": "auto", "inner": "inductor", "passes": None, "verify": False,
                                   "mode": None}
INNERS = ("inductor", "eager")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class KernoptError(RuntimeError):
    pass


def parse_options(options: Optional[dict], mode: Optional[str] = None) -> dict[str, Any]:
    opts = dict(DEFAULT_OPTIONS)
    unknown = sorted(set(options or {}) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"kernopt: unknown option(s) {', '.join(map(repr, unknown))}; "
                         f"valid options: {', '.join(DEFAULT_OPTIONS)}")
    opts.update(options or {})
    # torch.compile refuses mode= together with options=, so callers with options pass the mode inside them.
    if opts["mode"] is not None and mode is not None and opts["mode"] != mode:
        raise ValueError(f"kernopt: mode {mode!r} and options['mode'] {opts['mode']!r} disagree")
    mode = opts["mode"] if opts["mode"] is not None else mode
    if opts["scenario"] != "auto" and opts["scenario"] not in workload.SCENARIOS:
        raise ValueError(f"kernopt: unknown scenario {opts['scenario']!r}; valid: 'auto', "
                         + ", ".join(map(repr, workload.SCENARIOS)))
    if opts["inner"] not in INNERS:
        raise ValueError(f"kernopt: unknown inner compiler {opts['inner']!r}; valid: {', '.join(map(repr, INNERS))}")
    if mode not in MODES:
        raise ValueError(f"kernopt: unknown mode {mode!r}; valid: {', '.join(map(repr, MODES))}")
    opts["enabled"] = enabled_passes(opts["passes"])
    opts["mode"] = mode
    if not isinstance(opts["verify"], bool):
        raise ValueError("kernopt: option 'verify' takes True or False")
    return opts


def enabled_passes(spec: Any) -> tuple[str, ...]:
    if spec is None:
        return PASS_NAMES
    names = list(spec.keys()) if isinstance(spec, dict) else list(spec)
    unknown = [n for n in names if n not in PASS_NAMES]
    if unknown:
        raise ValueError(f"kernopt: unknown pass(es) {', '.join(map(repr, unknown))}; valid: {', '.join(PASS_NAMES)}")
    if isinstance(spec, dict):
        return tuple(n for n in PASS_NAMES if spec.get(n, True))
    return tuple(n for n in PASS_NAMES if n in names)


class Report:
    """Everything the backend did to the graphs it compiled: `rewrites` and `fallbacks` (with reasons)."""

    def __init__(self):
        self.rewrites: list[Rewrite] = []
        self.fallbacks: list[Fallback] = []
        self.graphs = 0
        self._lock = threading.Lock()

    def add(self, ctx: PassContext) -> None:
        with self._lock:
            self.rewrites.extend(ctx.rewrites)
            self.fallbacks.extend(ctx.fallbacks)

    def table(self) -> str:
        from tabulate import tabulate

        lines = []
        impls = sorted({r.implementation for r in self.rewrites})
        if not torch.cuda.is_available():
            lines.append("no CUDA device: kernopt ops ran as "
                         + (" / ".join(impls) if impls else "plain-torch references")
                         + " (interpreter = the Triton kernels under TRITON_INTERPRET=1)")
        lines.append(f"{self.graphs} graph(s), {len(self.rewrites)} rewrite(s), {len(self.fallbacks)} left alone")
        if self.rewrites:
            lines.append(tabulate([[r.graph, r.pass_name, r.matched, r.kernel, r.scenario, r.implementation, r.config]
                                   for r in self.rewrites],
                                  headers=["graph", "pass", "matched", "kernel op", "scenario", "runs as", "config"]))
        if self.fallbacks:
            lines.append(tabulate([[f.graph, f.pass_name, f.matched, f.reason] for f in self.fallbacks],
                                  headers=["graph", "pass", "left alone", "reason"]))
        return "\n\n".join(lines)

    __str__ = table

    def __repr__(self) -> str:
        return f"Report({len(self.rewrites)} rewrites, {len(self.fallbacks)} fallbacks)"


_graph_ids = itertools.count()
_active_reports: list[Report] = []  # explain() listens here


def run_passes(gm: fx.GraphModule, opts: dict, graph_id: int) -> PassContext:
    ctx = PassContext(graph_id=graph_id, scenario=opts["scenario"], cuda_graphs=opts["mode"] == "reduce-overhead")
    for name in opts["enabled"]:
        try:
            p = load(name)
        except (ImportError, AttributeError) as e:
            ctx.refused(name, "(graph)", "pass", f"pass unavailable: {e}")
            continue
        before = copy.deepcopy(gm.graph)
        n_rewrites = len(ctx.rewrites)
        try:
            p(gm, ctx)
            gm.graph.lint()
        except Exception as e:  # a bug in a pass must never cost the user a wrong answer or the model
            log.warning("kernopt: pass %s failed on graph %d: %s; graph left as it was", name, graph_id, e)
            gm.graph = before
            del ctx.rewrites[n_rewrites:]
            ctx.refused(name, "(graph)", "pass", f"pass raised {type(e).__name__}: {e}; graph left as it was")
    gm.recompile()
    return ctx


def _inner(gm: fx.GraphModule, example_inputs: Sequence, opts: dict) -> Callable:
    if opts["inner"] == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    patches = {}
    if opts["mode"] not in (None, "default"):
        patches = dict(torch._inductor.list_mode_options(opts["mode"]))
    if combo_kernels_enabled(example_inputs):
        patches["combo_kernels"] = True
    return compile_fx(gm, example_inputs, config_patches=patches) if patches else compile_fx(gm, example_inputs)


# Inductor's combo kernels (independent kernels of one graph launched as one): on by default for graphs with CUDA
# inputs (Triton GPU code only); KERNOPT_INDUCTOR_COMBO=0 turns them off (llama system kernopt_int4_nocombo), =1 on
# for every graph. H200 profiles (profiles/profile-8B-kernopt_int4{,_combo}.txt, 6d8bb8e): a decode step's q rotary,
# k rotary + cache write and v cache write (1.26 + 1.38 + 0.99 us per layer) became one 1.59 us kernel; the llama
# suite (sweeps/append, 7abfcf7, one run): 8B int4 bs1 decode step 2.84 -> 2.72 ms.
COMBO_ENV = "KERNOPT_INDUCTOR_COMBO"


def _on_cuda(example_inputs: Sequence) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def combo_kernels_enabled(example_inputs: Sequence = ()) -> bool:
    if os.environ.get(COMBO_ENV) is None:
        return _on_cuda(example_inputs)
    return env_switch(COMBO_ENV, "1")


def _outputs(result: Any) -> list:
    if isinstance(result, (list, tuple)):
        return list(result)
    return [result]


def compare_outputs(got: Any, want: Any) -> Optional[str]:
    for i, (g, w) in enumerate(zip(_outputs(got), _outputs(want))):
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            # Whole graphs chain many roundings: judge each output against its own magnitude.
            scale = max(1.0, float(w.detach().abs().max()) if w.numel() else 1.0)
            problem = tolerance.mismatch(g, w, w.dtype if w.dtype in tolerance.TOLERANCES else torch.float32,
                                         scale=4.0 * scale ** 0.5)
            if problem:
                return f"output {i}: {problem}"
    return None


def _verifying(compiled: Callable, original: fx.GraphModule, ctx: PassContext, opts: dict) -> Callable:
    state = {"checked": False}

    def run(*args):
        if state["checked"]:
            return compiled(*args)
        inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        want = original(*inputs)
        got = compiled(*args)
        state["checked"] = True
        problem = compare_outputs(got, want)
        if problem:
            culprits = _bisect(original, inputs, want, opts, ctx)
            raise KernoptError(f"kernopt verify: graph {ctx.graph_id} differs from the original after pass(es) "
                               f"{', '.join(culprits) or ', '.join(sorted({r.pass_name for r in ctx.rewrites}))}: "
                               f"{problem}")
        return got

    return run


def _bisect(original: fx.GraphModule, inputs: list, want: Any, opts: dict, ctx: PassContext) -> list[str]:
    """Which passes, each applied alone, change the graph's outputs."""
    culprits = []
    for name in sorted({r.pass_name for r in ctx.rewrites}):
        gm = fx.GraphModule(original, copy.deepcopy(original.graph))
        run_passes(gm, {**opts, "enabled": (name,)}, ctx.graph_id)
        if compare_outputs(gm(*inputs), want):
            culprits.append(name)
    return culprits


def _reserve_workspace(example_inputs: Sequence) -> None:
    """Allocate the single-pass kernels' arrival counters now, outside any CUDA-graph capture or the CUDA-graph
    trees' private memory pool (see kernels/workspace.py)."""
    devices = {t.device for t in example_inputs if isinstance(t, torch.Tensor) and t.is_cuda}
    if devices:
        from kernopt.kernels import workspace

        for device in devices:
            workspace.reserve(device)


def kernopt_backend(gm: fx.GraphModule, example_inputs: Sequence, mode: Optional[str] = None,
                    options: Optional[dict] = None) -> Callable:
    """The backend torch.compile calls (registered as "kernopt" through the torch_dynamo_backends entry point)."""
    opts = parse_options(options, mode)
    graph_id = next(_graph_ids)
    original = fx.GraphModule(gm, copy.deepcopy(gm.graph)) if opts["verify"] or opts["enabled"] else gm
    if opts["enabled"] and torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        # Our ops are inference kernels without backward formulas: a training graph stays as it was.
        ctx = PassContext(graph_id=graph_id)
        ctx.refused("backend", "(graph)", "graph",
                    "autograd graph (grad mode on, inputs require grad): run under torch.no_grad() or "
                    "torch.inference_mode() for kernopt rewrites")
    elif opts["enabled"]:
        ctx = run_passes(gm, opts, graph_id)
    else:
        ctx = PassContext(graph_id=graph_id)
    for report in list(_active_reports):
        report.graphs += 1
        report.add(ctx)
    if ctx.rewrites:
        _reserve_workspace(example_inputs)
    try:
        compiled = _inner(gm, example_inputs, opts)
    except Exception as e:
        if not ctx.rewrites:
            raise
        # Never lose the model to a rewrite: compile the original graph instead, and say why.
        log.warning("kernopt: inner compiler failed on the rewritten graph %d (%s); using the original", graph_id, e)
        for report in list(_active_reports):
            for r in ctx.rewrites:
                report.rewrites.remove(r)
                report.fallbacks.append(Fallback(graph_id, r.pass_name, r.node, r.matched,
                                                 f"inner compiler failed on the rewrite: {type(e).__name__}: {e}"))
        ctx.rewrites.clear()
        compiled = _inner(original, example_inputs, opts)
    if opts["verify"] and ctx.rewrites:
        return _verifying(compiled, original, ctx, opts)
    return compiled
