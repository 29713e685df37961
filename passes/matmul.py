"""Matmuls with fused epilogues -> `torch.ops.kernopt.linear`.

Patterns (plain torch; each is also the reference the op runs on CPU):

    F.linear(x, w, b)                                  # also x @ w.t(), x @ W, torch.mm, torch.addmm(b, x, W)
    act(F.linear(x, w, b))                             # act: F.silu, F.gelu (erf or tanh)
    F.linear(x, w) + b                                 # bias added after the matmul
    F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)    # Llama MLP SwiGLU: one kernel, one read of x

Guard: floating dtypes the kernel computes (fp16/bf16/fp32), one dtype and device for all operands, a 2-D
weight, intermediate results used only by the pattern; and the GEMM shape table
(`kernopt.kernels.gemm.prefer_triton`) must say the Triton kernel beats cuBLAS at this shape (else the
matmul stays with cuBLAS, and explain says why). A dynamic M defers that choice to the op, per call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from kernopt import ops, workload
from kernopt.passes.graph import (ADD, MUL, SILU, PassContext, arg, describe, example_value, insert_before, is_call,
                                  replace, single_user, size_hint, static_int)

LINEAR = (F.linear, torch._C._nn.linear)
MATMUL = (torch.matmul, __import__("operator").matmul, torch.mm, "matmul", "mm")
ADDMM = (torch.addmm, "addmm")
TRANSPOSE = ("t", torch.t)
GELU = (F.gelu, torch._C._nn.gelu, "gelu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _Match:
    """A linear layer found in the graph: y = x @ w.T (+ bias), w in nn.Linear's [N, K] layout."""

    def __init__(self, node: fx.Node, x: fx.Node, w: fx.Node, w_is_kn: bool, bias: Optional[fx.Node], form: str):
        self.node, self.x, self.w, self.w_is_kn, self.bias, self.form = node, x, w, w_is_kn, bias, form


def match_linear(node: fx.Node) -> tuple[Optional[_Match], Optional[str]]:
    """(match, None), or (None, reason) for a matmul-like node we won't take, or (None, None) if not one."""
    if is_call(node, *LINEAR):
        x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        return _Match(node, x, w, False, b, "linear"), None
    if is_call(node, *ADDMM):
        b, x, w = arg(node, 0, "input"), arg(node, 1, "mat1"), arg(node, 2, "mat2")
        if arg(node, 3, "beta", 1) != 1 or arg(node, 4, "alpha", 1) != 1:
            return None, "addmm with beta/alpha != 1"
        form = "addmm"
    elif is_call(node, *MATMUL):
        x, w, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other"), None
        form = "matmul"
    else:
        return None, None
    wv = example_value(w)
    if wv is None or wv.dim() != 2:
        return None, "batched matmul (second operand is not a 2-D weight)"
    # x @ W.t() with W in [N, K] is nn.Linear's own layout: use W directly, no transpose in the graph.
    if is_call(w, *TRANSPOSE) or (is_call(w, "transpose", torch.transpose) and set(w.args[1:3]) in ({0, 1}, {-1, -2})):
        return _Match(node, x, w.args[0], False, b, form), None
    return _Match(node, x, w, True, b, form), None


def _guard(m: _Match, tensors: list[Optional[torch.Tensor]]) -> Optional[str]:
    xv = example_value(m.x)
    if xv is None or any(t is None for t in tensors):
        return "operands have no recorded shapes"
    if xv.dtype not in DTYPES:
        return f"{str(xv.dtype).replace('torch.', '')}: the GEMM kernel takes fp16/bf16/fp32"
    if any(t.dtype != xv.dtype for t in tensors):
        return "mixed dtypes: " + ", ".join(sorted({str(t.dtype).replace('torch.', '') for t in tensors}))
    if any(t.device != xv.device for t in tensors):
        return "operands on different devices"
    if xv.dim() < 1:
        return "0-d input"
    return None


class MatmulPass:
    name = "matmul"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        gemm = ops.kernel_module("gemm")
        seen: set[fx.Node] = set()
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node in seen:
                continue
            if is_call(node, *MUL):
                self._swiglu(gm, ctx, gemm, node, seen)
        for node in list(gm.graph.nodes):
            if node in seen or node.op not in ("call_function", "call_method"):
                continue
            m, reason = match_linear(node)
            if m is None:
                if reason:
                    ctx.refused(self.name, node, describe(node), reason)
                continue
            self._linear(gm, ctx, gemm, m)

    # silu(x @ wg.T) * (x @ wu.T)
    def _swiglu(self, gm, ctx, gemm, mul: fx.Node, seen: set) -> None:
        if len(mul.args) != 2 or mul.kwargs:
            return
        a, b = mul.args
        for gate_act, up in ((a, b), (b, a)):
            if not (is_call(gate_act, *SILU) and isinstance(up, fx.Node)):
                continue
            gate, _ = match_linear(gate_act.args[0]) if gate_act.args and isinstance(gate_act.args[0], fx.Node) else (None, None)
            upm, _ = match_linear(up)
            if gate is None or upm is None:
                continue
            matched = "silu(linear) * linear (swiglu)"
            if gate.x is not upm.x:
                return  # two different inputs: not the MLP pattern; each linear is matched on its own
            reason = None
            if gate.bias is not None or upm.bias is not None:
                reason = "swiglu with biased projections"
            elif gate.w_is_kn or upm.w_is_kn:
                reason = "swiglu weights not in [N, K] layout"
            elif gate_act.kwargs.get("inplace") or single_user(gate_act.args[0]) is not gate_act \
                    or single_user(gate_act) is not mul or single_user(up) is not mul:
                reason = "gate/up results are used outside the pattern"
            else:
                reason = _guard(gate, [example_value(gate.w), example_value(upm.w)])
            seen.update((gate.node, upm.node))
            if reason is None:
                reason = self._rewrite(gm, ctx, gemm, mul, gate, gate.w, None, upm.w, "swiglu", matched,
                                       dead=[gate_act, gate.node, up])
            if reason:
                ctx.refused(self.name, mul, matched, reason)
            return

    def _linear(self, gm, ctx, gemm, m: _Match) -> None:
        activation, tail, dead = "none", m.node, []
        bias = m.bias
        user = single_user(m.node)
        # F.linear(x, w) + b with a 1-D b of width N: fold the add into the epilogue
        if bias is None and user is not None and is_call(user, *ADD) and len(user.args) == 2 and not user.kwargs:
            other = user.args[1] if user.args[0] is m.node else user.args[0]
            ov, yv = example_value(other), example_value(m.node)
            if ov is not None and yv is not None and ov.dim() == 1 and ov.shape[0] == yv.shape[-1] \
                    and ov.dtype == yv.dtype:
                bias, dead, tail = other, [m.node], user
                user = single_user(user)
        if user is not None and not user.kwargs.get("inplace") and user.args and user.args[0] is tail:
            if is_call(user, *SILU):
                activation = "silu"
            elif is_call(user, *GELU):
                approx = arg(user, 1, "approximate", "none")
                activation = {"none": "gelu", "tanh": "gelu_tanh"}.get(approx, "none")
            if activation != "none":
                dead, tail = dead + [tail], user
        matched = {"none": "linear", "silu": "silu(linear)", "gelu": "gelu(linear)",
                   "gelu_tanh": "gelu_tanh(linear)"}[activation]
        if m.form != "linear":
            matched += f" [{m.form}]"
        if bias is not None:
            matched += "+bias"
        tensors = [example_value(m.w)] + ([example_value(bias)] if bias is not None else [])
        reason = _guard(m, tensors)
        if reason is None:
            w = m.w
            if m.w_is_kn:  # x @ W with W [K, N]: the kernel reads W.t() through its strides, no copy
                wv = example_value(m.w)
                w = insert_before(gm, m.node, torch.t, (m.w,), wv.t() if wv is not None else None)
            reason = self._rewrite(gm, ctx, gemm, tail, m, w, bias, None, activation, matched, dead=dead + [m.node])
            if reason and w is not m.w:
                gm.graph.erase_node(w)
        if reason:
            ctx.refused(self.name, m.node, matched, reason)

    def _rewrite(self, gm, ctx, gemm, tail, m: _Match, w, bias, w_up, activation, matched, dead) -> Optional[str]:
        xv, wv = example_value(m.x), example_value(m.w)
        n = (wv.shape[1] if m.w_is_kn else wv.shape[0])
        k = xv.shape[-1]
        rows = 1
        for s in xv.shape[:-1]:
            rows = rows * s
        static_m = static_int(rows) if not isinstance(rows, int) else rows
        m_hint = size_hint(rows)
        n, k = size_hint(n), size_hint(k)
        impl = ops.implementation(xv)
        if static_m is not None and impl == "triton":
            why_not = gemm.prefer_triton(static_m, n, k, activation, xv.dtype)
            if why_not:
                return why_not
        elif impl != "triton" and activation == "none" and bias is None:
            return f"plain matmul on {xv.device.type}: nothing to fuse without the GPU kernel"
        config = gemm.select_config(m_hint, n, k, activation, xv.dtype) if impl != "reference" else "plain-torch reference"
        scenario = workload.scenario_for_activation(ctx.scenario, [size_hint(d) for d in xv.shape])
        if static_m is None:
            config = f"dynamic M (per-call choice; M={m_hint}: {config})"
        replace(gm, tail, torch.ops.kernopt.linear.default, (m.x, w, bias, w_up, activation), dead=dead)
        ctx.rewrote(self.name, tail, matched + f" M={m_hint} N={n} K={k}", "kernopt.linear", config, scenario, impl)
        return None
