"""FP8 (e4m3) linear layers: weights quantized per output channel, activations per token at run time.

The format (the one `kernopt.kernels.fp8_gemm` reads):

    weight        float8_e4m3fn [N, K]   w[n, k] ~= weight[n, k] * weight_scale[n]
    weight_scale  float32 [N]            amax of row n / 448 (an all-zero row gets a tiny floor, not 0)
    bias          [N] or None            in the layer's original dtype

`Fp8Linear.forward` is the plain-torch reference of `torch.ops.kernopt.fp8_linear`
(`fp8_linear_ref`): quantize x per row (amax / 448 -> e4m3), upcast both operands to fp32, matmul,
multiply by x_scale * weight_scale, add the bias, cast back to x's dtype. That is the op's exact math, so
the fp8 pass (passes/fp8.py) can rewrite it to the Triton kernels and the compiled model computes what
the eager model computes (up to fp32 summation order). We chose this over the "dequantize the weight,
then F.linear" form: that form keeps activations in bf16 (a weight-only scheme), and rewriting it to a
kernel that quantizes activations would change the result by a few percent, which the pass refuses to do.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from kernopt.kernels.fp8_gemm import FP8_DTYPE, fp8_linear_ref, quantize_weight_fp8
from kernopt.kernels.host import env_switch


class Fp8Linear(nn.Module):
    """y = x @ W.T + b with W in e4m3 (per-output-channel scales) and x quantized per token at run time."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, device=device, dtype=FP8_DTYPE))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, device=device, dtype=dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device,
                dtype=w.dtype)
        q, s = quantize_weight_fp8(w)
        m.weight.copy_(q)
        m.weight_scale.copy_(s)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def _apply(self, fn, recurse=True):
        # float8 counts as floating point, so model.to(torch.bfloat16) / .half() would cast the codes to
        # bf16 and the scales too: keep the codes e4m3 and the scales fp32 (devices still move).
        codes, scale = self.weight, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8_DTYPE:
            self.weight = codes.to(self.weight.device)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    # Set by kernopt.optimize(): eager calls on a GPU run the fused op (kernopt.ops.eager_kernel says when).
    kernel_in_eager = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kernopt import ops

        if ops.eager_kernel(self, x):
            return torch.ops.kernopt.fp8_linear(x, self.weight, self.weight_scale, self.bias)
        return fp8_linear_ref(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=e4m3 per-channel, activations=e4m3 per-token")


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip)


def quantize_fp8_(model: nn.Module, skip: Iterable[str] = ("lm_head",),
                  filter_fn: Optional[callable] = None) -> nn.Module:
    """Swap every nn.Linear of `model` for an Fp8Linear, in place; returns the model.

    `skip` names modules to keep in high precision (by full name or last name component);
    `filter_fn(name, module)` may further decline a layer. Layers whose K is not a multiple of 16 are kept
    too (cuBLAS-compatible shapes; the Triton kernel would take them, but such layers are rare and tiny).
    """
    skip = tuple(skip)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear) or _skipped(name, skip):
                continue
            if filter_fn is not None and not filter_fn(name, child):
                continue
            if child.in_features % 16:
                continue
            setattr(parent, child_name, Fp8Linear.from_linear(child))
    return model


# --------------------------------------------------------------------------------------------------
# Linears that read one input: adjacent storage, so one kernel launch computes them all
# --------------------------------------------------------------------------------------------------
GROUP_ENV = "KERNOPT_FP8_GROUP"


def grouping_enabled() -> bool:
    """Whether fp8 linears that share an input are packed (`optimize`) and fused into one launch (the fp8 pass's
    `fp8_group`). ``KERNOPT_FP8_GROUP=0`` turns both off: every linear keeps its own tensors and its own launch."""
    return env_switch(GROUP_ENV, "1")


def _compatible(a: Fp8Linear, b: Fp8Linear) -> Optional[str]:
    """Why two Fp8Linear modules cannot share buffers, or None."""
    for what, va, vb in (("in_features", a.in_features, b.in_features), ("device", a.weight.device, b.weight.device),
                         ("weight dtype", a.weight.dtype, b.weight.dtype),
                         ("weight_scale dtype", a.weight_scale.dtype, b.weight_scale.dtype)):
        if va != vb:
            return f"{what} differs ({va} vs {vb})"
    return None


def pack_adjacent(modules: Sequence[Fp8Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-lay Fp8Linear modules (same in_features, device and dtypes) into shared buffers: their weights become
    consecutive row blocks of one [N1 + N2 + ..., K] e4m3 tensor and their scales of one [N1 + N2 + ...] tensor,
    so the group as a whole is one weight (`kernopt.ops.adjacent_view`) and
    `torch.ops.kernopt.fp8_linear_prequant_group` runs one launch for all of them. Biases are packed the same way
    when every module has one (of one dtype); otherwise each keeps its own. Values are copied exactly, so every
    module's forward is unchanged; the old tensors are released as each module takes its view.

    Returns the group's combined (weight [Ntot, K], weight_scale [Ntot]) views.
    Note: the modules' state_dict tensors now share storage (safetensors refuses shared tensors; save a model
    packed like this with torch.save, or quantize again after loading)."""
    from kernopt.int4 import check_packable, pack_biases

    mods = check_packable(modules, Fp8Linear, _compatible)
    first = mods[0]
    widths = [m.out_features for m in mods]
    total, dev = sum(widths), first.weight.device
    with torch.no_grad():
        w_base = torch.empty((total, first.in_features), dtype=first.weight.dtype, device=dev)
        s_base = torch.empty(total, dtype=first.weight_scale.dtype, device=dev)
        b_base = pack_biases(mods, total, dev)
        row = 0
        for m, n in zip(mods, widths):
            rows = slice(row, row + n)
            w_base[rows].copy_(m.weight)
            s_base[rows].copy_(m.weight_scale.reshape(-1))
            m.weight, m.weight_scale = w_base[rows], s_base[rows]
            if b_base is not None:
                b_base[rows].copy_(m.bias)
                m.bias = b_base[rows]
            row += n
    return w_base, s_base


def pack_shared_input_linears_(model: nn.Module, groups: Iterable[Iterable[str]]) -> list[list[str]]:
    """`pack_adjacent` each group of module names (`kernopt.int4.linears_sharing_input`), over the members that are
    Fp8Linear modules able to share buffers with the group's first. Returns the groups packed."""
    from kernopt import int4

    return int4.pack_shared_input_linears_(model, groups, Fp8Linear, _compatible, pack_adjacent)


def quantize_fp8_grouped_(model: nn.Module, skip: Iterable[str] = ("lm_head",),
                          run: Optional[Callable[[], Any]] = None) -> list[list[str]]:
    """`quantize_fp8_`, then `pack_shared_input_linears_` over the linears that read one input (found on the float
    model before quantizing, by `run` or by name: `kernopt.int4.linears_sharing_input`), unless
    KERNOPT_FP8_GROUP=0. What `kernopt.optimize(quantize="fp8")` and `kernopt explain --quantize fp8` do. Returns
    the packed groups."""
    from kernopt.int4 import linears_sharing_input

    shared = linears_sharing_input(model, run) if grouping_enabled() else []
    quantize_fp8_(model, skip=skip)
    return pack_shared_input_linears_(model, shared)
