"""FP8 matmuls -> `torch.ops.kernopt.fp8_scaled_mm` / `torch.ops.kernopt.fp8_linear`.

Patterns (plain torch; a8, w8 are float8_e4m3fn, `up` is .float() / .to(dtype) / .half() / .bfloat16()):

    torch._scaled_mm(a8, b8, scale_a, scale_b, bias=b, out_dtype=dt)            # cuBLAS's contract
    ((up(a8) @ up(w8).t()) * sa * sw [+ b]).to(dt)                               # scale after the matmul:
                                                                                #   kernopt.fp8.Fp8Linear's form
    F.linear(up(a8) * sa, up(w8) * sw[:, None], b)   (or @ with .t())          # dequantize, then matmul
    a8 = (up(x) / s).clamp(-448, 448).to(e4m3),                                 # per-token quantization
    s = up(x).abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448  (or * 1/448) #   feeding the 2nd form:
                                                                                #   -> fp8_linear(x, ...)

sa is a per-row [.., M, 1] or scalar scale, sw a per-output-channel ([N], [1, N] or [N, 1] as the form
needs) or scalar scale. When a8 is the per-token quantization of x with the same scale node, the whole
subgraph becomes `fp8_linear(x, w8, sw, b)` (the quantization runs as kernopt's Triton kernel);
otherwise the matmul + scaling becomes `fp8_scaled_mm` and the quantization stays in the graph.

RMSNorm fusion (after the matmuls are rewritten): when an fp8_linear's input x is Hugging Face's LlamaRMSNorm
written in plain torch (`match_rmsnorm`: to(float32), pow(2), mean(-1, keepdim=True), + eps, rsqrt, mul,
to(dtype), * weight) and every user of the norm's output is such an fp8_linear (Llama: q/k/v after
input_layernorm, gate/up after post_attention_layernorm), the norm and the per-linear quantizations become one
`rmsnorm_quant_fp8(x, weight, eps)` whose (codes, scales) feed `fp8_linear_prequant` for each linear. Its
reference is the same ops in the same order, so on the reference path fused == unfused bit for bit; the
kernel differs only where its summation order or rsqrt moves the norm by an ulp. Refused with a reason when
the norm's output or an intermediate has another user (the norm must then stay); a norm whose eps is not a
constant (torch.compile(dynamic=True) lifts float attributes to inputs) is not recognised and stays unfused.

Prompt lane (graphs without CUDA graphs, PROMPT_ENV): a kernopt op's Python (dispatch, config, Triton launch with
tensor descriptors) costs ~100+ us of host time a call, and a compiled forward that runs without CUDA graphs pays it
on the critical path (see PROMPT_ENV below for the H200 numbers). There, an `fp8_linear` of a static PROMPT_MIN_ROWS
rows or more becomes `prompt_linear`: torch._scaled_mm (cuBLAS, row-wise scales) on the graph's own per-token
quantization, one quantization per input shared by every linear that reads it, all plain torch that Inductor fuses
and launches from its generated code. Same math as the reference (the quantization's very ops; fp32 accumulation).

Guard: e4m3fn operands (e5m2 refused), 2-D weight, fp32-convertible scales of the shapes above, 1-D bias of
width N, float output dtype, intermediates used only by the pattern. Refused with a reason:
per-input-channel scales; `_scaled_mm` with scale_result or without out_dtype; and weight-only fp8
(`F.linear(x, up(w8) * sw[:, None])` with x not quantized): the kernels quantize activations per token,
which would move the result by a few percent, so that stays as written (never wrong, at worst not faster).
"""
from __future__ import annotations

import operator
import os
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from kernopt import ops, workload
from kernopt.fp8 import grouping_enabled
from kernopt.passes import grouping
from kernopt.passes.graph import (ADD, MUL, PassContext, arg, describe, example_value, insert_before, is_call,
                                  leading_rows, replace, single_user, size_hint, static_int)

E4M3 = torch.float8_e4m3fn
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
LINEAR = (F.linear, torch._C._nn.linear)
MATMUL = (torch.matmul, operator.matmul, torch.mm, "matmul", "mm")
TRANSPOSE = ("t", torch.t)
UPCAST = ("float", "to", "half", "bfloat16", "type")
DIV = (operator.truediv, torch.div, torch.true_divide, "div", "true_divide")
CLAMP = (torch.clamp, "clamp", torch.clip, "clip")
AMAX_FLOOR = 1e-12  # kernopt.kernels.fp8_gemm.AMAX_FLOOR (passes may not import kernels directly)
FP8_MAX = 448.0
INV_FP8_MAX = float(torch.tensor(1.0 / 448.0, dtype=torch.float32))  # the kernel's scale = amax * this


def _dtype_of(node) -> Optional[torch.dtype]:
    v = example_value(node)
    return v.dtype if v is not None else None


def _shape(node) -> Optional[tuple]:
    v = example_value(node)
    return tuple(v.shape) if v is not None else None


def upcast_source(node) -> Optional[fx.Node]:
    """For `up(t8)` with t8 an e4m3 tensor and a float result, t8; else None."""
    if not is_call(node, *UPCAST) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    if _dtype_of(src) == E4M3 and _dtype_of(node) in FLOATS:
        return src
    return None


def _strip_transpose(node) -> tuple[Optional[fx.Node], bool]:
    """(inner, True) for t.t() / t.T / t.transpose(0, 1) of a 2-D t; (node, False) otherwise."""
    if is_call(node, *TRANSPOSE):
        return node.args[0], True
    if is_call(node, getattr) and len(node.args) == 2 and node.args[1] in ("T", "mT"):
        return node.args[0], True
    if is_call(node, "transpose", torch.transpose) and len(node.args) == 3 and \
            set(node.args[1:3]) in ({0, 1}, {-1, -2}, {0, -1}, {-2, 1}):
        return node.args[0], True
    return node, False


def _weight_operand(node) -> tuple[Optional[fx.Node], Optional[str]]:
    """The [N, K] e4m3 weight behind `up(w8).t()` / `up(w8.t())` (matmul's second operand)."""
    inner, transposed = _strip_transpose(node)
    src = upcast_source(inner)
    if src is not None:
        if not transposed:
            return None, None  # up(b8) with b8 [K, N]: handled by the caller as a [K, N] operand
        return src, None
    if transposed:
        return None, None
    src = upcast_source(node)
    if src is not None:
        inner, transposed = _strip_transpose(src)
        if transposed:
            return inner, None
    return None, None


def _dequant(node) -> tuple[Optional[fx.Node], Optional[fx.Node]]:
    """(t8, s) for `up(t8) * s` or `s * up(t8)`."""
    if not is_call(node, *MUL) or len(node.args) != 2:
        return None, None
    for t, s in (node.args, node.args[::-1]):
        src = upcast_source(t)
        if src is not None and isinstance(s, fx.Node):
            return src, s
    return None, None


def _is_scalar_scale(s) -> bool:
    shape = _shape(s)
    return shape is not None and all(size_hint(d) == 1 for d in shape)


def _row_scale_ok(s, lead: tuple) -> bool:
    """A per-row scale of an activation with leading dims `lead`: shape (*lead, 1), or a scalar."""
    shape = _shape(s)
    if shape is None:
        return False
    if _is_scalar_scale(s):
        return True
    return len(shape) >= 1 and size_hint(shape[-1]) == 1 and \
        [size_hint(d) for d in shape[:-1]][-len(lead):] == [size_hint(d) for d in lead] and \
        all(size_hint(d) == 1 for d in shape[:-1 - len(lead)])


def _col_scale_ok(s, n: int) -> bool:
    """A per-output-channel scale multiplying a [.., N] result: (N,), (1, .., N), or a scalar."""
    shape = _shape(s)
    if shape is None:
        return False
    if _is_scalar_scale(s):
        return True
    return len(shape) >= 1 and size_hint(shape[-1]) == n and all(size_hint(d) == 1 for d in shape[:-1])


def _const(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) else None


class _Fp8Matmul:
    """What the rewrite needs: a8 [.., K], w8 [N, K] (or b8 [K, N]), the scales, bias, output dtype."""

    def __init__(self):
        self.a8 = self.w8 = self.b8 = self.sa = self.sw = self.bias = None
        self.out_dtype: Optional[torch.dtype] = None
        self.tail: Optional[fx.Node] = None
        self.dead: list[fx.Node] = []
        self.form = ""


class Fp8Pass:
    name = "fp8"
    fuse_rmsnorm = True  # False keeps each fp8_linear quantizing its own input (tests compare both)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self._linear_records: dict[fx.Node, object] = {}  # fp8_linear node -> its Rewrite record
        self._lane_inputs: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}  # x -> the (codes, scale) its lane linears share
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op not in ("call_function", "call_method"):
                continue
            if is_call(node, torch._scaled_mm):
                self._scaled_mm(gm, ctx, node)
            elif is_call(node, *LINEAR, *MATMUL):
                m, reason, matched = self._match_matmul(node)
                if reason:
                    ctx.refused(self.name, node, matched, reason)
                elif m is not None:
                    self._rewrite(gm, ctx, m)
        if self.fuse_rmsnorm:
            self._fuse_rmsnorms(gm, ctx)
        if grouping_enabled():
            group_shared_inputs(gm, ctx)

    # ---------------------------------------------------------------------------------------------
    # torch._scaled_mm
    # ---------------------------------------------------------------------------------------------
    def _scaled_mm(self, gm, ctx, node: fx.Node) -> None:
        a, b = arg(node, 0, "self"), arg(node, 1, "mat2")
        sa, sb = arg(node, 2, "scale_a"), arg(node, 3, "scale_b")
        bias, scale_result = arg(node, 4, "bias"), arg(node, 5, "scale_result")
        out_dtype = arg(node, 6, "out_dtype")
        matched = "torch._scaled_mm"
        reason = None
        av, bv, sav, sbv = (example_value(t) for t in (a, b, sa, sb))
        if any(v is None for v in (av, bv, sav, sbv)):
            reason = "operands have no recorded shapes"
        elif av.dtype != E4M3 or bv.dtype != E4M3:
            reason = f"operands {av.dtype}/{bv.dtype}: the kernel takes float8_e4m3fn"
        elif scale_result is not None:
            reason = "scale_result (fp8 output) is not supported"
        elif out_dtype not in FLOATS:
            reason = f"out_dtype {out_dtype}: the kernel writes bf16/fp16/fp32"
        elif sav.dtype != torch.float32 or sbv.dtype != torch.float32:
            reason = "scales are not float32"
        elif not (sav.numel() == 1 or tuple(sav.shape) == (av.shape[0], 1)):
            reason = f"scale_a of shape {tuple(sav.shape)}: tensor-wise or [M, 1] row-wise only"
        elif not (sbv.numel() == 1 or tuple(sbv.shape) == (1, bv.shape[1])):
            reason = f"scale_b of shape {tuple(sbv.shape)}: tensor-wise or [1, N] row-wise only"
        elif bias is not None and (example_value(bias) is None or example_value(bias).dim() != 1):
            reason = "bias is not 1-D"
        if reason:
            ctx.refused(self.name, node, matched, reason)
            return
        m, n, k = size_hint(av.shape[0]), size_hint(bv.shape[1]), size_hint(av.shape[1])
        impl = ops.implementation(av)
        replace(gm, node, torch.ops.kernopt.fp8_scaled_mm.default, (a, b, sa, sb, bias, out_dtype))
        ctx.rewrote(self.name, node, f"{matched} M={m} N={n} K={k}", "kernopt.fp8_scaled_mm",
                    self._config(m, n, k, impl), workload.resolve_scenario(ctx.scenario, tokens=m), impl)

    # ---------------------------------------------------------------------------------------------
    # matmul / linear on fp8 operands
    # ---------------------------------------------------------------------------------------------
    def _match_matmul(self, node: fx.Node) -> tuple[Optional[_Fp8Matmul], Optional[str], str]:
        is_linear = is_call(node, *LINEAR)
        if is_linear:
            x, w, bias = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        else:
            if len(node.args) != 2:
                return None, None, ""
            (x, w), bias = node.args, None
        if not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
            return None, None, ""
        m = _Fp8Matmul()
        # (1) dequantize-then-matmul: both operands are up(t8) * s
        a8, sa = _dequant(x)
        if is_linear:
            w8, sw = _dequant(w)
        else:
            inner, transposed = _strip_transpose(w)
            w8, sw = _dequant(inner) if transposed else (None, None)
        if w8 is not None and a8 is None:
            if upcast_source(x) is None:
                return None, ("weight-only fp8 (activations not quantized): the fp8 kernels quantize "
                              "activations per token, which would change the result"), "dequant(w8) -> linear"
        if a8 is not None and w8 is not None:
            m.form = "dequant -> " + ("linear" if is_linear else "matmul")
            m.a8, m.w8, m.sa, m.sw, m.bias, m.tail = a8, w8, sa, sw, bias, node
            inner = _strip_transpose(w)[0] if not is_linear else w
            m.dead = [node, x, w, inner, *x.args[:2], *inner.args[:2]]
            m.out_dtype = _dtype_of(node)
            return m, self._guard(m, dequant=True), m.form
        # (2) matmul on the raw codes, scales applied to the result
        a8 = upcast_source(x)
        if a8 is None:
            return None, None, ""
        if is_linear:
            w8 = upcast_source(w)
        else:
            w8, _ = _weight_operand(w)
            if w8 is None and upcast_source(w) is not None:
                m.b8 = upcast_source(w)  # up(b8) with b8 [K, N]
        if w8 is None and m.b8 is None:
            return None, None, ""
        m.form = "fp8 " + ("linear" if is_linear else "matmul") + " * scales"
        m.a8, m.w8 = a8, w8
        dead = [node, x, w]
        if not is_linear:
            inner, transposed = _strip_transpose(w)
            if transposed:
                dead.append(inner)
        # the epilogue chain: * s1 * s2 [+ bias] [.to(dtype)]
        scales, tail = [], node
        for _ in range(2):
            user = single_user(tail)
            if user is None or not is_call(user, *MUL) or len(user.args) != 2:
                break
            other = user.args[1] if user.args[0] is tail else user.args[0]
            if not isinstance(other, fx.Node):
                break
            scales.append(other)
            dead.append(tail)
            tail = user
        if len(scales) != 2:
            return None, "fp8 matmul without a row scale and a column scale after it", m.form
        user = single_user(tail)
        n = self._n(m)
        if bias is None and user is not None and is_call(user, *ADD) and len(user.args) == 2:
            other = user.args[1] if user.args[0] is tail else user.args[0]
            ov = example_value(other)
            if ov is not None and ov.dim() == 1 and size_hint(ov.shape[0]) == n:
                bias = other
                dead.append(tail)
                tail = user
                user = single_user(tail)
        m.out_dtype = _dtype_of(tail)
        if user is not None and is_call(user, "to", "float", "half", "bfloat16") and _dtype_of(user) in FLOATS \
                and len(user.args) <= 2 and not user.kwargs:
            dead.append(tail)
            tail = user
            m.out_dtype = _dtype_of(user)
        lead = _shape(a8)[:-1] if _shape(a8) is not None else ()
        s1, s2 = scales
        if _row_scale_ok(s1, lead) and _col_scale_ok(s2, n):
            m.sa, m.sw = s1, s2
        elif _row_scale_ok(s2, lead) and _col_scale_ok(s1, n):
            m.sa, m.sw = s2, s1
        else:
            return None, (f"scales of shapes {_shape(s1)} and {_shape(s2)}: need a per-row [.., M, 1] (or "
                          f"scalar) and a per-channel [N] / [1, N] (or scalar) scale"), m.form
        m.bias, m.tail, m.dead = bias, tail, dead
        return m, self._guard(m, dequant=False), m.form

    def _n(self, m: _Fp8Matmul) -> int:
        if m.w8 is not None:
            return size_hint(_shape(m.w8)[0])
        return size_hint(_shape(m.b8)[1])

    def _guard(self, m: _Fp8Matmul, dequant: bool) -> Optional[str]:
        a_shape = _shape(m.a8)
        w = m.w8 if m.w8 is not None else m.b8
        w_shape = _shape(w)
        if a_shape is None or w_shape is None:
            return "operands have no recorded shapes"
        if len(w_shape) != 2:
            return "batched matmul (second operand is not a 2-D weight)"
        if len(a_shape) < 1:
            return "0-d input"
        if m.out_dtype not in FLOATS:
            return f"output dtype {m.out_dtype}: the kernel writes bf16/fp16/fp32"
        n = self._n(m)
        if m.bias is not None:
            bv = example_value(m.bias)
            if bv is None or bv.dim() != 1 or size_hint(bv.shape[0]) != n:
                return "bias is not 1-D of width N"
        if dequant:
            lead = a_shape[:-1]
            if not _row_scale_ok(m.sa, lead):
                return f"activation scale of shape {_shape(m.sa)}: per-row [.., M, 1] or scalar only"
            sw_shape = _shape(m.sw)
            if sw_shape is None or not (_is_scalar_scale(m.sw) or
                                        (len(sw_shape) == 2 and size_hint(sw_shape[0]) == n and
                                         size_hint(sw_shape[1]) == 1)):
                return f"weight scale of shape {sw_shape}: per-output-channel [N, 1] or scalar only"
        for s in (m.sa, m.sw):
            if _dtype_of(s) not in FLOATS:
                return f"scale dtype {_dtype_of(s)}"
        for t in (m.sa, m.sw, m.bias, m.b8):
            v = example_value(t) if t is not None else None
            if v is not None and v.device != example_value(m.a8).device:
                return "operands on different devices"
        return None

    # ---------------------------------------------------------------------------------------------
    # the per-token quantization feeding a8
    # ---------------------------------------------------------------------------------------------
    @staticmethod
    def _quantized_from(a8: fx.Node, sa: fx.Node) -> Optional[tuple[fx.Node, list]]:
        """(x, the quantization's nodes) when a8 = (up(x) / sa).clamp(-448, 448).to(e4m3) and sa = up(x).abs().amax(-1, keepdim).clamp(1e-12) / 448."""
        def source(n):  # x for up(x) or x itself
            if is_call(n, "float", "to") and n.args and isinstance(n.args[0], fx.Node) and \
                    _dtype_of(n) == torch.float32 and _dtype_of(n.args[0]) in FLOATS:
                return n.args[0]
            return n if _dtype_of(n) == torch.float32 else None

        chain: list[fx.Node] = []
        if not is_call(a8, "to") or _dtype_of(a8) != E4M3:
            return None
        clamp = a8.args[0]
        if not is_call(clamp, *CLAMP) or _const(arg(clamp, 1, "min")) != -FP8_MAX or \
                _const(arg(clamp, 2, "max")) != FP8_MAX:
            return None
        div = clamp.args[0]
        if not is_call(div, *DIV) or len(div.args) != 2 or div.args[1] is not sa:
            return None
        x = source(div.args[0])
        if x is None or len(sa.args) != 2:
            return None
        if is_call(sa, *DIV) and _const(sa.args[1]) == FP8_MAX:  # amax / 448
            floor = sa.args[0]
        elif is_call(sa, *MUL) and INV_FP8_MAX in (_const(sa.args[0]), _const(sa.args[1])):  # amax * (1 / 448)
            floor = sa.args[0] if isinstance(sa.args[0], fx.Node) else sa.args[1]
        else:
            return None
        if not is_call(floor, *CLAMP, "clamp_min") or _const(arg(floor, 1, "min")) != AMAX_FLOOR:
            return None
        amax = floor.args[0]
        if not is_call(amax, "amax", torch.amax) or arg(amax, 1, "dim") not in (-1, (-1,), [-1]) or \
                not arg(amax, 2, "keepdim", False):
            return None
        ab = amax.args[0]
        if not is_call(ab, "abs", torch.abs) or source(ab.args[0]) is not x:
            return None
        chain = [a8, clamp, div, div.args[0], sa, floor, amax, ab, ab.args[0]]
        return x, chain

    # ---------------------------------------------------------------------------------------------
    def _config(self, m: int, n: int, k: int, impl: str) -> str:
        if impl == "reference":
            return "plain-torch reference"
        from kernopt.kernels import fp8_gemm

        return fp8_gemm.config_str(fp8_gemm.select_config(m, n, k))

    def _as_fp32(self, gm, anchor, s: fx.Node) -> fx.Node:
        if _dtype_of(s) == torch.float32:
            return s
        v = example_value(s)
        return insert_before(gm, anchor, torch.Tensor.float, (s,), v.float() if v is not None else None)

    def _rewrite(self, gm: fx.GraphModule, ctx: PassContext, m: _Fp8Matmul) -> None:
        av = example_value(m.a8)
        lead, k = tuple(av.shape[:-1]), av.shape[-1]
        n = self._n(m)
        rows = 1
        for s in lead:
            rows = rows * s
        m_hint, k_hint = size_hint(rows), size_hint(k)
        anchor = m.tail
        quant = self._quantized_from(m.a8, m.sa) if m.w8 is not None else None
        x, chain = quant if quant is not None else (None, [])
        if x is not None and m.out_dtype == _dtype_of(x):
            if self._prompt_lane(gm, ctx, m, x, chain, rows, n, k):
                return
            sw = self._as_fp32(gm, anchor, m.sw)
            impl = ops.implementation(example_value(x))
            new = replace(gm, m.tail, torch.ops.kernopt.fp8_linear.default, (x, m.w8, sw, m.bias),
                          dead=m.dead + chain)
            matched = f"quant_rows(x) -> {m.form} M={m_hint} N={n} K={k_hint}"
            ctx.rewrote(self.name, anchor, matched, "kernopt.fp8_linear", self._config(m_hint, n, k_hint, impl),
                        workload.scenario_for_activation(ctx.scenario,
                                                         [size_hint(d) for d in example_value(x).shape]), impl)
            self._linear_records[new] = ctx.rewrites[-1]
            return
        sa, sw = self._as_fp32(gm, anchor, m.sa), self._as_fp32(gm, anchor, m.sw)
        a2 = m.a8
        if len(lead) != 1:
            # flatten/size nodes, not sizes: a dynamic size is a SymInt, which a graph may not hold as a constant
            a2 = insert_before(gm, anchor, torch.flatten, (m.a8, 0, -2), av.flatten(0, -2))
            if not _is_scalar_scale(sa):
                sa = insert_before(gm, anchor, torch.flatten, (sa, 0, -2), None)
        b = m.b8
        if b is None:
            wv = example_value(m.w8)
            b = insert_before(gm, anchor, torch.t, (m.w8,), wv.t() if wv is not None else None)
        with gm.graph.inserting_before(anchor):
            y = gm.graph.call_function(torch.ops.kernopt.fp8_scaled_mm.default,
                                       (a2, b, sa, sw, m.bias, m.out_dtype))
        out = y
        if len(lead) != 1:
            with gm.graph.inserting_before(anchor):
                dims = [d if static_int(d) is not None else gm.graph.call_method("size", (m.a8, i))
                        for i, d in enumerate(lead)]
                out = gm.graph.call_function(torch.reshape, (y, (*[static_int(d) if not isinstance(d, fx.Node)
                                                                    else d for d in dims], n)))
        impl = ops.implementation(av)
        replace_with(gm, m.tail, out, m.dead)
        ctx.rewrote(self.name, anchor, f"{m.form} M={m_hint} N={n} K={k_hint}", "kernopt.fp8_scaled_mm",
                    self._config(m_hint, n, k_hint, impl), workload.resolve_scenario(ctx.scenario, tokens=m_hint),
                    impl)


    def _prompt_lane(self, gm, ctx, m: _Fp8Matmul, x: fx.Node, chain: list, rows, n: int, k) -> bool:
        """The per-token-quantized linear as `prompt_linear` (module docstring) when the graph runs without CUDA
        graphs and has a static PROMPT_MIN_ROWS rows or more; False (the kernel) otherwise, with the reason when
        the rows qualified but the lane cannot take the operands."""
        if ctx.cuda_graphs or prompt_mode() != "auto":
            return False
        rows = static_int(rows)  # None for symbolic rows (a dynamic graph): the kernel
        if rows is None or rows < PROMPT_MIN_ROWS:
            return False
        matched = f"quant_rows(x) -> {m.form} M={rows} N={n} K={size_hint(k)}"
        bias = m.bias
        if is_call(bias, "float", "to") and bias.args and isinstance(bias.args[0], fx.Node) and \
                _dtype_of(bias.args[0]) == m.out_dtype and _dtype_of(bias) == torch.float32:
            bias = bias.args[0]  # the reference's bias.float(): _scaled_mm adds the bf16 bias in fp32 itself
        reason = _lane_refusal(m, x, bias, n, k)
        if reason:
            ctx.refused(PROMPT_PASS_NAME, m.tail, matched, f"kernopt.fp8_linear instead: {reason}")
            return False
        codes, scale = self._lane_inputs.setdefault(x, (m.a8, m.sa))
        sw = self._as_fp32(gm, m.tail, m.sw)
        replace(gm, m.tail, prompt_linear, (codes, scale, m.w8, sw, bias, m.out_dtype),
                dead=m.dead + chain + [m.bias])
        on_gpu = example_value(x).is_cuda
        ctx.rewrote(self.name, m.tail, matched, "torch._scaled_mm (prompt lane)",
                    "row-wise scales" + ("" if codes is m.a8 else ", input quantization shared"),
                    workload.scenario_for_activation(ctx.scenario, [size_hint(d) for d in example_value(x).shape]),
                    "cuBLAS" if on_gpu else "torch")
        return True

    # ---------------------------------------------------------------------------------------------
    # RMSNorm feeding only fp8 linears -> one rmsnorm_quant_fp8 (the norm and the quantization in one pass)
    # ---------------------------------------------------------------------------------------------
    def _fuse_rmsnorms(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        fp8_linear = torch.ops.kernopt.fp8_linear.default
        by_input: dict[fx.Node, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is fp8_linear and isinstance(node.args[0], fx.Node):
                by_input.setdefault(node.args[0], []).append(node)
        for out, linears in by_input.items():
            norm = match_rmsnorm(out)
            if norm is None:
                continue
            matched = f"rmsnorm -> quant_rows -> {len(linears)}x fp8_linear"
            reason = norm.refusal or _norm_users_refusal(out, linears)
            if reason:
                ctx.refused(self.name, out, matched, reason)
                continue
            self._fuse_rmsnorm(gm, ctx, norm, linears, matched)

    def _fuse_rmsnorm(self, gm, ctx, norm: "RMSNormMatch", linears: list, matched: str) -> None:
        out, x, w = norm.out, norm.x, norm.weight
        xv, wv = example_value(x), example_value(w)
        k = xv.shape[-1]
        rows = leading_rows(xv)
        with gm.graph.inserting_before(out):
            fused = gm.graph.call_function(torch.ops.kernopt.rmsnorm_quant_fp8.default, (x, w, norm.eps))
            q = gm.graph.call_function(operator.getitem, (fused, 0))
            s = gm.graph.call_function(operator.getitem, (fused, 1))
        q.meta["example_value"] = xv.new_empty(xv.shape, dtype=E4M3)
        s.meta["example_value"] = xv.new_empty((rows, 1), dtype=torch.float32)
        fused.meta["example_value"] = (q.meta["example_value"], s.meta["example_value"])
        for lin in linears:
            _, w8, sw, bias = lin.args
            rec = self._linear_records.get(lin)
            new = replace(gm, lin, torch.ops.kernopt.fp8_linear_prequant.default,
                          (q, s, w8, sw, bias, _dtype_of(lin)))
            if rec is not None:
                rec.kernel = "kernopt.fp8_linear_prequant"
                rec.matched = rec.matched.replace("quant_rows(x)", "rmsnorm_quant_fp8(x)", 1)
                self._linear_records[new] = rec
        for user in list(out.users):  # shape queries: the norm's output has x's shape
            user.replace_input_with(out, x)
        impl = ops.implementation(xv)
        if ops.implementation(wv) == "reference":
            impl = "reference"
        config = "plain-torch reference"
        if impl != "reference":
            from kernopt.kernels import rmsnorm_quant

            config = rmsnorm_quant.select_config(size_hint(rows), size_hint(k))
        m_hint = size_hint(rows)
        ctx.rewrote(self.name, out, f"{matched} M={m_hint} K={size_hint(k)}", "kernopt.rmsnorm_quant_fp8",
                    config, workload.scenario_for_activation(ctx.scenario, [size_hint(d) for d in xv.shape]), impl)
        for nd in norm.nodes:  # users before what they use
            if not nd.users:
                gm.graph.erase_node(nd)


class RMSNormMatch:
    """LlamaRMSNorm as Dynamo records it; `nodes` from the output back, `refusal` set when it cannot fuse."""

    def __init__(self, out, x, weight, eps, nodes, refusal=None):
        self.out, self.x, self.weight, self.eps, self.nodes, self.refusal = out, x, weight, eps, nodes, refusal


def _const_float(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def match_rmsnorm(out: fx.Node) -> Optional[RMSNormMatch]:
    """Hugging Face's LlamaRMSNorm.forward (kernopt.kernels.rmsnorm_quant.rmsnorm_ref), as Dynamo records it:

        h = x.to(torch.float32)                   # or x.float(); or x itself when x is fp32
        var = h.pow(2).mean(-1, keepdim=True)     # or h * h, torch.mean
        hn = h * torch.rsqrt(var + eps)           # either operand order
        out = weight * hn.to(x.dtype)             # either operand order; the cast may be absent for fp32

    None when `out` is not that; a match with `refusal` when it is, but the kernel cannot take it."""
    if not is_call(out, *MUL) or len(out.args) != 2 or out.kwargs:
        return None
    for w, c in (out.args, out.args[::-1]):
        if not isinstance(w, fx.Node) or not isinstance(c, fx.Node):
            continue
        cast = c if is_call(c, "to", "float", "half", "bfloat16", "type") and c.args and \
            isinstance(c.args[0], fx.Node) else None
        hn = cast.args[0] if cast is not None else c
        if not is_call(hn, *MUL) or len(hn.args) != 2 or hn.kwargs:
            continue
        for h, r in (hn.args, hn.args[::-1]):
            if not is_call(r, torch.rsqrt, "rsqrt") or len(r.args) != 1 or not isinstance(h, fx.Node):
                continue
            add = r.args[0]
            if not is_call(add, *ADD) or len(add.args) != 2 or add.kwargs:
                continue
            var, eps = add.args if isinstance(add.args[0], fx.Node) else add.args[::-1]
            eps = _const_float(eps)
            if eps is None or not is_call(var, "mean", torch.mean) or not var.args:
                continue
            p = var.args[0]
            if not (is_call(p, "pow", torch.pow, operator.pow) and len(p.args) == 2 and p.args[0] is h and
                    _const_float(p.args[1]) == 2.0 and not p.kwargs) and \
                    not (is_call(p, *MUL) and len(p.args) == 2 and p.args[0] is h and p.args[1] is h):
                continue
            up = is_call(h, "to", "float", "type") and h.args and isinstance(h.args[0], fx.Node)
            x = h.args[0] if up else h
            nodes = [out, *([cast] if cast is not None else []), hn, r, add, var, p, *([h] if up else [])]
            return RMSNormMatch(out, x, w, eps, nodes, _rmsnorm_refusal(out, x, w, h, cast, var, nodes))
    return None


def _rmsnorm_refusal(out, x, w, h, cast, var, nodes) -> Optional[str]:
    xv, wv, ov, hv = (example_value(t) for t in (x, w, out, h))
    if any(v is None for v in (xv, wv, ov, hv)):
        return "rmsnorm operands have no recorded shapes"
    if xv.dtype not in FLOATS or wv.dtype not in FLOATS:
        return f"rmsnorm of {xv.dtype} with a {wv.dtype} weight: the kernel takes bf16/fp16/fp32"
    if hv.dtype != torch.float32 or hv.device != xv.device:
        return f"rmsnorm computes in {hv.dtype} on {hv.device}, not fp32 on {xv.device} (not HF's LlamaRMSNorm)"
    hn_dtype = _dtype_of(cast) if cast is not None else torch.float32
    if hn_dtype != xv.dtype:
        return f"normalized value cast to {hn_dtype}, not back to the input's {xv.dtype}"
    if xv.dim() < 1 or wv.dim() != 1 or size_hint(wv.shape[0]) != size_hint(xv.shape[-1]):
        return f"weight of shape {tuple(wv.shape)} for rows of {tuple(xv.shape)[-1:]}: need a [K] weight"
    if ov.dtype != torch.promote_types(wv.dtype, xv.dtype) or tuple(ov.shape) != tuple(xv.shape):
        return f"output {ov.dtype} {tuple(ov.shape)}: expected weight * x's dtype and x's shape"
    if wv.device != xv.device:
        return "weight and input on different devices"
    dim, keepdim = arg(var, 1, "dim"), arg(var, 2, "keepdim", False)
    last = (-1, xv.dim() - 1)
    if not (dim in last or (isinstance(dim, (list, tuple)) and len(dim) == 1 and dim[0] in last)) or \
            keepdim is not True or var.kwargs.get("dtype") is not None or len(var.args) > 3:
        return "mean is not over the last dimension with keepdim=True"
    inner = set(nodes)
    for nd in nodes[1:]:
        stray = [u for u in nd.users if u not in inner]
        if stray:
            return f"the norm's intermediate {nd.name} is also used by {stray[0].name}"
    return None


def _norm_users_refusal(out: fx.Node, linears: list) -> Optional[str]:
    for user in out.users:
        if user in linears and user.args[0] is out and out not in user.args[1:]:
            continue
        if is_call(user, "size", "dim") or (is_call(user, getattr) and user.args[1:] == ("shape",)):
            continue
        return f"the norm's output also feeds {describe(user)}, which needs it unquantized"
    return None


# ------------------------------------------------------------------------------------------------
# The prompt lane
# ------------------------------------------------------------------------------------------------
# Who runs a per-token-quantized fp8 linear (kernopt.fp8.Fp8Linear's form) in a graph without CUDA graphs (a plain
# torch.compile(model, backend="kernopt") of a prompt, the llama suite's `prefill b1 s2048`):
# - "auto" (default): linears of a static PROMPT_MIN_ROWS rows or more take `prompt_linear` (torch._scaled_mm on the
#   graph's own quantization, Inductor's launches); fewer or symbolic rows (a dynamic graph may meet one row, a decode
#   step) and graphs under CUDA graphs keep kernopt.fp8_linear. Why: on the H200 the 8B fp8 prompt forward had 33.3 ms
#   of kernels in a call that returned after 41.6 ms and finished after 44.3 (profiles/profile-8B-kernopt_fp8-forward-
#   host-0562e2f.txt: 10 kernopt ops a layer, ~130 us of host each), against 52.2 ms of kernels for bf16. With the
#   lane (sweeps/fp8_lane, 792c61e, same run): 8B prefill b1 s2048 38.97 ms against 50.49 on kernopt.fp8_linear.
# - "kernel": kernopt.fp8_linear at every row count (the llama suite's kernopt_fp8_prompt_kernel system).
PROMPT_ENV = "KERNOPT_FP8_PROMPT"
PROMPT_MODES = ("auto", "kernel")
PROMPT_MIN_ROWS = 192  # as the int4 pass's prompt lane (passes/int4.py PROMPT_AUTO_MIN_ROWS)
PROMPT_PASS_NAME = "fp8_prompt"


def prompt_mode() -> str:
    v = os.environ.get(PROMPT_ENV, "auto")
    if v not in PROMPT_MODES:
        raise ValueError(f"{PROMPT_ENV}={v!r}; valid: {', '.join(map(repr, PROMPT_MODES))}")
    return v


def prompt_linear(codes: torch.Tensor, scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                  bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_linear on a quantized input, as torch._scaled_mm: codes [.., K] e4m3 with scale [.., 1] fp32 (the
    per-token quantization), w8 [N, K] e4m3, w_scale [N] fp32; -> [.., N] in out_dtype. Plain torch, traced by
    Inductor like the rest of the graph."""
    k = codes.shape[-1]
    y = torch._scaled_mm(codes.reshape(-1, k), w8.t(), scale_a=scale.reshape(-1, 1),
                         scale_b=w_scale.reshape(1, -1), bias=bias, out_dtype=out_dtype)
    return y.reshape(*codes.shape[:-1], w8.shape[0])


def _lane_refusal(m: _Fp8Matmul, x: fx.Node, bias: Optional[fx.Node], n: int, k) -> Optional[str]:
    """Why prompt_linear cannot take this linear (None when it can): what CUDA's row-wise _scaled_mm accepts."""
    xv, wv, sv = example_value(x), example_value(m.w8), example_value(m.sw)
    if m.out_dtype != torch.bfloat16:
        return f"{m.out_dtype} output: row-wise torch._scaled_mm writes bf16 only"
    if size_hint(k) % 16 or n % 16:
        return f"K={size_hint(k)}, N={n}: torch._scaled_mm needs multiples of 16"
    if sv is None or sv.numel() != n:
        return f"weight scale of shape {_shape(m.sw)}: the lane takes a per-channel scale of N={n} entries"
    if wv is None or not wv.is_contiguous():
        return "weight is not a contiguous [N, K] tensor"
    if bias is not None and _dtype_of(bias) != torch.bfloat16:
        return f"bias of {_dtype_of(bias)}: torch._scaled_mm adds a bias of its output dtype"
    if xv.is_cuda and torch.cuda.get_device_capability(xv.device) < (8, 9):
        return "GPU without fp8 tensor cores (sm_89+)"
    if xv.device.type not in ("cuda", "cpu"):
        return f"device {xv.device.type}"
    return None


# ------------------------------------------------------------------------------------------------
# fp8_linear_prequant nodes of one quantized input -> one launch (kernopt.fp8.GROUP_ENV)
# ------------------------------------------------------------------------------------------------
GROUP_PASS_NAME = "fp8_group"  # its own name in reports: the fp8 rewrites stay one per linear


def group_shared_inputs(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Replace fp8_linear_prequant nodes that read the same (codes, scale) nodes into the same output dtype (q/k/v
    after one rmsnorm_quant_fp8, gate/up after another) by one `kernopt.fp8_linear_prequant_group` node and a
    column slice per linear. Not for the prompt lane's linears (cuBLAS launches from Inductor's code)."""
    prequant = torch.ops.kernopt.fp8_linear_prequant.default

    def key_of(n: fx.Node):
        if len(n.args) != 6 or n.kwargs:
            return None
        q, s, w8, _, _, out_dtype = n.args
        wv = example_value(w8) if isinstance(w8, fx.Node) else None
        if example_value(n) is None or wv is None or static_int(wv.shape[0]) is None:
            return None  # a column offset must be a constant
        return q, s, out_dtype

    grouping.group_shared_inputs(gm, prequant, key_of, lambda key, members, order: _group(gm, ctx, members, order))


def _group(gm: fx.GraphModule, ctx: PassContext, members: list[fx.Node], order: dict[fx.Node, int]) -> None:
    # kernopt.fp8.pack_adjacent lays q, k, v out in call order, so the storage order is normally graph order
    # (biases do not decide it: the op concatenates them when they are not adjacent, a small copy)
    members, adjacent = grouping.storage_order(members, (2, 3), (), ops.adjacent_view, flat=(3,))
    q, s, out_dtype = members[0].args[0], members[0].args[1], members[0].args[5]
    anchor = grouping.anchor_after_inputs(gm, members, order)
    widths = [static_int(example_value(m.args[2]).shape[0]) for m in members]
    args = (q, s, [m.args[2] for m in members], [m.args[3] for m in members], [m.args[4] for m in members], out_dtype)
    group = insert_before(gm, anchor, torch.ops.kernopt.fp8_linear_prequant_group.default, args,
                          torch.cat([example_value(m) for m in members], dim=-1))
    grouping.replace_with_slices(gm, anchor, group, members, widths)
    qv = example_value(q)
    k = qv.shape[-1]
    m_hint = size_hint(leading_rows(qv))
    impl = ops.implementation(qv)

    def pick() -> str:
        from kernopt.kernels import fp8_gemm

        return fp8_gemm.config_str(fp8_gemm.select_config(m_hint, sum(widths), size_hint(k)))

    config = grouping.launch_config(impl, adjacent, pick)
    ctx.rewrote(GROUP_PASS_NAME, group,
                f"{len(members)} fp8_linear_prequant of one input -> one launch M={m_hint} "
                f"N={'+'.join(map(str, widths))} K={size_hint(k)}", "kernopt.fp8_linear_prequant_group", config,
                workload.scenario_for_activation(ctx.scenario, [size_hint(d) for d in qv.shape]), impl)


def replace_with(gm: fx.GraphModule, old: fx.Node, new: fx.Node, dead) -> None:
    """Like graph.replace, for a replacement already built from several nodes."""
    new.meta.update({k: v for k, v in old.meta.items() if k in ("example_value", "val", "stack_trace",
                                                                "nn_module_stack", "source_fn_stack")})
    old.replace_all_uses_with(new)
    order = {nd: i for i, nd in enumerate(gm.graph.nodes)}
    doomed = {nd for nd in [old, *dead] if isinstance(nd, fx.Node) and nd in order}
    for nd in sorted(doomed, key=order.__getitem__, reverse=True):
        if nd.op in ("call_function", "call_method") and not nd.users:
            gm.graph.erase_node(nd)


__all__ = ["Fp8Pass", "describe"]
