"""Group-wise INT4 weight-only quantization: kernopt's format, round-to-nearest quantization, the
`Int4Linear` module, `quantize_int4_` (swap nn.Linear in place) and GPTQ / AWQ checkpoint loaders.

The format (the one `kernopt.kernels.int4_gemm` reads; its docstring says why it is stored N-contiguous):

    qweight  int32 [N, K // 8]      nibble i of word [n, j] is the code q[n, 8j + i] in [0, 15]
    scales   [N, K // g]            fp16 / bf16 (the float weight's dtype; fp32 for fp32 weights)
    zeros    [N, K // g] or None    asymmetric: integer zero points in [0, 15], stored in scales' dtype;
                                    symmetric: None, meaning zero = 8 (codes are q = round(w / s) + 8)
    w[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]

Storage: all three are kept N-contiguous (``t.t().contiguous().t()``: the transpose of a row-major
[K/8, N] / [K/g, N] tensor, GPTQ's own storage); the shapes above are the logical ones every API uses.

Loaders convert other packings into it once, at load time:

- GPTQ (AutoGPTQ / GPTQModel, "gptq" v1 checkpoints): qweight int32 [K/8, N] packed along K (the same
  words: ours is its transpose), qzeros int32 [K/g, N/8] packed along N and stored minus one, scales
  [K/g, N]. `g_idx` with act-order permutations is refused (not a plain group layout).
- AWQ (AutoAWQ GEMM): qweight int32 [K, N/8] packed along N in the interleaved nibble order
  0, 2, 4, 6, 1, 3, 5, 7; qzeros [K/g, N/8] packed the same way; scales [K/g, N].
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from kernopt.kernels.int4_gemm import dequantize_int4, int4_gemm_ref, unpack_int4

GROUP_SIZES = (32, 64, 128)
_SHIFTS = tuple(range(0, 32, 4))
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8j + AWQ_ORDER[i]
log = logging.getLogger("kernopt")


def n_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same [N, X] values stored N-contiguous (stride (1, N)): the layout the kernels load fastest."""
    return t.t().contiguous().t()


def _to_int32_words(acc: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same bits (two's complement)."""
    return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] in [0, 15] (any int dtype) -> int32 [N, K // 8], nibble i of word j = q[:, 8j + i]."""
    if q.dim() != 2 or q.shape[1] % 8:
        raise ValueError(f"pack_int4: codes must be [N, K] with K % 8 == 0, got {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_int4: codes must lie in [0, 15]")
    q = q.to(torch.int64).reshape(q.shape[0], -1, 8)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=q.device)
    return _to_int32_words((q << shifts).sum(-1))


def _unpack_words_along_last(words: torch.Tensor, order: Iterable[int] = range(8)) -> torch.Tensor:
    """int32 [..., W] -> int32 [..., 8W]: nibble i of word j is element 8j + order[i]."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=words.device)
    nib = (words.unsqueeze(-1) >> shifts) & 0xF  # [..., W, 8], nibble position i
    inverse = [0] * 8
    for i, col in enumerate(order):
        inverse[col] = i
    nib = nib[..., inverse]  # element c of each word comes from nibble position inverse[c]
    return nib.reshape(*words.shape[:-1], -1)


# --------------------------------------------------------------------------------------------------
# Quantization (round to nearest)
# --------------------------------------------------------------------------------------------------
def quantize_weight(weight: torch.Tensor, group_size: int = 128, symmetric: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Float [N, K] -> (qweight, scales, zeros) in kernopt's format, round-to-nearest per group."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if weight.dim() != 2 or weight.shape[1] % group_size:
        raise ValueError(f"weight must be [N, K] with K a multiple of group_size={group_size}, "
                         f"got {tuple(weight.shape)}")
    N, K = weight.shape
    scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    w = weight.detach().float().reshape(N, K // group_size, group_size)
    if symmetric:
        # Codes -8..7 around zero 8: the largest magnitude maps to +-7 so both signs round alike.
        scales = (w.abs().amax(-1) / 7).clamp_min(1e-8).to(scale_dtype)
        q = torch.round(w / scales.float().unsqueeze(-1)).clamp(-8, 7) + 8
        zeros = None
    else:
        lo, hi = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)
        scales = ((hi - lo) / 15).clamp_min(1e-8).to(scale_dtype)
        zeros_f = torch.round(-lo / scales.float()).clamp(0, 15)
        q = (torch.round(w / scales.float().unsqueeze(-1)) + zeros_f.unsqueeze(-1)).clamp(0, 15)
        zeros = zeros_f.to(scale_dtype)
    return (n_contiguous(pack_int4(q.reshape(N, K).to(torch.int32))), n_contiguous(scales),
            n_contiguous(zeros) if zeros is not None else None)


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------
class Int4Linear(nn.Module):
    """y = x @ dequant(qweight, scales, zeros).T + bias. Eager forward is the plain-torch reference
    (unpack with shifts and masks, subtract zeros, multiply scales, matmul); the int4 pass rewrites it
    to `torch.ops.kernopt.int4_linear` under torch.compile(backend="kernopt")."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False,
                 symmetric: bool = True, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if group_size not in GROUP_SIZES or in_features % group_size:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} and divide in_features={in_features}, "
                             f"got {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32,
                                                    device=device).t())
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=dtype, device=device).t())
        self.register_buffer("zeros", None if symmetric else
                             torch.full((groups, out_features), 8, dtype=dtype, device=device).t())
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = True) -> "Int4Linear":
        qweight, scales, zeros = quantize_weight(linear.weight, group_size, symmetric)
        return cls.from_packed(qweight, scales, zeros, group_size, linear.bias)

    @classmethod
    def from_packed(cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                    group_size: int, bias: Optional[torch.Tensor] = None) -> "Int4Linear":
        N, K = qweight.shape[0], qweight.shape[1] * 8
        m = cls(K, N, group_size, bias is not None, zeros is None, scales.dtype, qweight.device)
        m.qweight = n_contiguous(qweight)
        m.scales = n_contiguous(scales)
        m.zeros = n_contiguous(zeros) if zeros is not None else None
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, dtype or self.scales.dtype)

    # Set by kernopt.optimize(): eager calls on a GPU run the fused op (kernopt.ops.eager_kernel says when).
    kernel_in_eager = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kernopt import ops

        if ops.eager_kernel(self, x):
            return torch.ops.kernopt.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)
        return int4_gemm_ref(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"symmetric={self.zeros is None}, bias={self.bias is not None}")


# --------------------------------------------------------------------------------------------------
# Linears that read one input: adjacent storage, so one kernel launch computes them all
# --------------------------------------------------------------------------------------------------
GROUP_ENV = "KERNOPT_INT4_GROUP"


def grouping_enabled() -> bool:
    """Whether int4 linears that share an input are packed (`optimize`) and fused into one launch (the int4
    pass). ``KERNOPT_INT4_GROUP=0`` turns both off: every linear keeps its own tensors and its own launch."""
    return os.environ.get(GROUP_ENV, "1") != "0"


def _compatible(a: "Int4Linear", b: "Int4Linear") -> Optional[str]:
    """Why two Int4Linear modules cannot share buffers, or None."""
    for what, va, vb in (("in_features", a.in_features, b.in_features), ("group_size", a.group_size, b.group_size),
                         ("scales dtype", a.scales.dtype, b.scales.dtype), ("device", a.qweight.device, b.qweight.device),
                         ("symmetric", a.zeros is None, b.zeros is None)):
        if va != vb:
            return f"{what} differs ({va} vs {vb})"
    if a.zeros is not None and a.zeros.dtype != b.zeros.dtype:
        return f"zeros dtype differs ({a.zeros.dtype} vs {b.zeros.dtype})"
    return None


def check_packable(modules: Iterable[nn.Module], cls: type, compatible: Callable) -> list[nn.Module]:
    """The modules as a list, each a `cls` that can share buffers with the first (`compatible(a, b)` says why
    not), else a clear error: pack_adjacent's checks, for int4 and fp8 (kernopt/fp8.py) alike."""
    mods = list(modules)
    if not mods:
        raise ValueError("pack_adjacent: no modules")
    for m in mods:
        if not isinstance(m, cls):
            raise TypeError(f"pack_adjacent: {type(m).__name__} is not an {cls.__name__}")
        why = compatible(mods[0], m)
        if why:
            raise ValueError(f"pack_adjacent: modules cannot share buffers: {why}")
    return mods


def pack_biases(mods: list[nn.Module], total: int, device) -> Optional[torch.Tensor]:
    """One [total] buffer for the modules' biases when every module has one, of one dtype (pack_adjacent copies
    each into its block); else None, and each keeps its own."""
    biases = [m.bias for m in mods]
    if any(b is None for b in biases) or len({b.dtype for b in biases}) != 1:
        return None
    return torch.empty(total, dtype=biases[0].dtype, device=device)


def pack_adjacent(modules: Sequence["Int4Linear"]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Re-lay Int4Linear modules (same in_features, group size, dtypes, device and symmetry) into shared
    buffers: their qweights become adjacent column blocks of one row-major [K/8, N1 + N2 + ...] int32 tensor
    (scales and zeros: of one [K/g, N1 + N2 + ...] tensor), so each module's qweight is a [N_i, K/8] view with
    strides (1, Ntot), still kernopt's N-contiguous format, and the group as a whole is one [Ntot, K/8]
    weight (`kernopt.ops.adjacent_view`): `torch.ops.kernopt.int4_linear_group` then runs one launch for
    all of them. Biases are packed the same way when every module has one (of one dtype); otherwise each
    keeps its own. Values are copied exactly, so every module's forward is unchanged; the old tensors are
    released as each module takes its view (memory-neutral once done; the peak is one group's size more).

    Returns the group's combined (qweight [Ntot, K/8], scales [Ntot, K/g], zeros or None) views.
    Note: the modules' state_dict tensors now share storage (safetensors refuses shared tensors; save a
    model packed like this with torch.save, or quantize again after loading)."""
    mods = check_packable(modules, Int4Linear, _compatible)
    first = mods[0]
    K, G, dev = first.in_features, first.in_features // first.group_size, first.qweight.device
    widths = [m.qweight.shape[0] for m in mods]
    total = sum(widths)
    with torch.no_grad():
        q_base = torch.empty((K // 8, total), dtype=torch.int32, device=dev)
        s_base = torch.empty((G, total), dtype=first.scales.dtype, device=dev)
        z_base = torch.empty((G, total), dtype=first.zeros.dtype, device=dev) if first.zeros is not None else None
        b_base = pack_biases(mods, total, dev)
        col = 0
        for m, n in zip(mods, widths):
            cols = slice(col, col + n)
            q_base[:, cols].copy_(m.qweight.t())
            s_base[:, cols].copy_(m.scales.t())
            m.qweight, m.scales = q_base[:, cols].t(), s_base[:, cols].t()
            if z_base is not None:
                z_base[:, cols].copy_(m.zeros.t())
                m.zeros = z_base[:, cols].t()
            if b_base is not None:
                b_base[cols].copy_(m.bias)
                m.bias = nn.Parameter(b_base[cols], requires_grad=False)
            col += n
    return q_base.t(), s_base.t(), z_base.t() if z_base is not None else None


# Fallback when a forward pass cannot be traced: sibling modules known to read one input.
SHARED_INPUT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def linears_sharing_input(model: nn.Module, run: Optional[Callable[[], Any]] = None,
                          types: tuple = (nn.Linear, Int4Linear)) -> list[list[str]]:
    """Names of the modules of `types` that read the same input tensor, in groups of two or more (each in
    the order the forward calls them).

    With `run` (a callable running one forward pass, e.g. on a two-token input), found by tracing: a forward
    pre-hook records which tensor object each module receives, call after call; modules that receive the
    same objects in every call read one input (q/k/v projections, gate/up of a gated MLP, whatever the model
    names them). Without `run`, or when it raises, by name: siblings in one parent named as in
    SHARED_INPUT_SIBLINGS."""
    if run is not None:
        calls: dict[str, list[int]] = {}
        first_call: dict[str, int] = {}
        alive: list = []  # inputs held until the end, so no id is reused for another object

        def hook(name):
            def record(module, args):
                x = args[0] if args else None
                alive.append(x if isinstance(x, torch.Tensor) else object())  # a non-tensor matches nothing
                calls.setdefault(name, []).append(id(alive[-1]))
                first_call.setdefault(name, len(first_call))
            return record

        handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in model.named_modules()
                   if isinstance(mod, types)]
        try:
            with torch.no_grad():
                run()
            traced = True
        except Exception as e:  # a model whose forward needs more than the given inputs: fall back to names
            log.info("kernopt: tracing shared linear inputs failed (%s: %s); grouping by module names",
                     type(e).__name__, e)
            traced = False
        finally:
            for h in handles:
                h.remove()
        if traced:
            by_inputs: dict[tuple, list[str]] = {}
            for name in sorted(calls, key=first_call.__getitem__):
                by_inputs.setdefault(tuple(calls[name]), []).append(name)
            return [names for names in by_inputs.values() if len(names) > 1]
    groups = []
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        for siblings in SHARED_INPUT_SIBLINGS:
            if all(isinstance(children.get(c), types) for c in siblings):
                groups.append([f"{parent_name}.{c}" if parent_name else c for c in siblings])
    return groups


def pack_shared_input_linears_(model: nn.Module, groups: Iterable[Iterable[str]], cls: Optional[type] = None,
                               compatible: Optional[Callable] = None,
                               pack: Optional[Callable] = None) -> list[list[str]]:
    """`pack_adjacent` each group of module names (`linears_sharing_input`), over the members that are
    Int4Linear modules able to share buffers with the group's first. Returns the groups packed. (`cls`,
    `compatible`, `pack`: another format's module type, check and packing; kernopt/fp8.py passes its own.)"""
    cls, compatible, pack = cls or Int4Linear, compatible or _compatible, pack or pack_adjacent
    packed = []
    for names in groups:
        mods = [(n, model.get_submodule(n)) for n in names]
        mods = [(n, m) for n, m in mods if isinstance(m, cls)]
        if len(mods) < 2:
            continue
        mods = [(n, m) for n, m in mods if compatible(mods[0][1], m) is None]
        if len(mods) < 2:
            continue
        pack([m for _, m in mods])
        packed.append([n for n, _ in mods])
    return packed


def _skipped(name: str, skip: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(name == s or parts[-1] == s or name.endswith("." + s) for s in skip)


def quantize_int4_grouped_(model: nn.Module, group_size: int = 128, skip: Iterable[str] = ("lm_head",),
                           run: Optional[Callable[[], Any]] = None) -> list[list[str]]:
    """`quantize_int4_`, then `pack_shared_input_linears_` over the linears that read one input (found on the
    float model before quantizing, by `run` or by name: `linears_sharing_input`), unless KERNOPT_INT4_GROUP=0.
    What `kernopt.optimize(quantize="int4")` and `kernopt explain --quantize int4` do. Returns the packed groups."""
    shared = linears_sharing_input(model, run) if grouping_enabled() else []
    quantize_int4_(model, group_size=group_size, skip=skip)
    return pack_shared_input_linears_(model, shared)


def quantize_int4_(model: nn.Module, group_size: int = 128, symmetric: bool = True,
                   skip: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear in `model` (in place) by an Int4Linear, except those named in `skip`
    (a module's full name or its last component) and those whose in_features is not a multiple of
    group_size, which stay in high precision. Returns `model`."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    skip = tuple(skip or ())
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not _skipped(name, skip) and mod.in_features % group_size == 0]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int4Linear.from_linear(mod, group_size, symmetric))
    return model


# --------------------------------------------------------------------------------------------------
# Loaders: GPTQ / AWQ packed tensors -> kernopt's format
# --------------------------------------------------------------------------------------------------
def _group_size_of(scales_kg_n: torch.Tensor, K: int, N: int, qzeros: torch.Tensor, who: str) -> int:
    """The group size of a checkpoint's scales [K/g, N], after checking them and qzeros [K/g, N/8] against K, N."""
    groups = scales_kg_n.shape[0]
    if scales_kg_n.dim() != 2 or groups == 0 or K % groups or scales_kg_n.shape[1] != N:
        raise ValueError(f"{who}: scales {tuple(scales_kg_n.shape)} must be [K/g, N] with K={K}, N={N} "
                         f"(g dividing K)")
    if qzeros.dim() != 2 or qzeros.shape[0] != groups or qzeros.shape[1] < -(-N // 8):
        # wider is fine (packers that pad N to a multiple of 32): the columns past N are dropped
        raise ValueError(f"{who}: qzeros {tuple(qzeros.shape)} must be [K/g, >= N/8] = [{groups}, {-(-N // 8)}]")
    return K // groups


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              g_idx: Optional[torch.Tensor] = None, zeros_minus_one: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """GPTQ tensors (qweight int32 [K/8, N], qzeros int32 [K/g, N/8], scales [K/g, N]) ->
    (qweight [N, K/8], scales [N, K/g], zeros [N, K/g], group_size). `zeros_minus_one`: v1 checkpoints
    store zero - 1 (the `zeros + 1` of AutoGPTQ's dequant); v2 checkpoints store the zero itself."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    g = _group_size_of(scales, K, N, qzeros, "from_gptq")
    if g_idx is not None:
        expected = torch.arange(K, device=g_idx.device) // g
        if not torch.equal(g_idx.to(expected.dtype), expected):
            raise ValueError("from_gptq: g_idx is not k // group_size (act-order checkpoint); "
                             "reorder the weight's columns first, kernopt reads plain groups only")
    zeros = _unpack_words_along_last(qzeros.to(torch.int32))[:, :N]  # [K/g, N]
    if zeros_minus_one:
        zeros = zeros + 1
    # GPTQ stores [K/8, N] and [K/g, N] row-major: their .t() views are kernopt's N-contiguous storage.
    return qweight.t(), scales.t(), zeros.to(scales.dtype).t(), g


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """AWQ GEMM tensors (qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales [K/g, N], interleaved
    nibble order AWQ_ORDER) -> (qweight [N, K/8], scales [N, K/g], zeros [N, K/g], group_size)."""
    K, N = qweight.shape[0], qweight.shape[1] * 8
    g = _group_size_of(scales, K, N, qzeros, "from_awq")
    codes = _unpack_words_along_last(qweight.to(torch.int32), AWQ_ORDER)  # [K, N]
    zeros = _unpack_words_along_last(qzeros.to(torch.int32), AWQ_ORDER)[:, :N]  # [K/g, N]
    return n_contiguous(pack_int4(codes.t())), scales.t(), zeros.to(scales.dtype).t(), g


def load_int4_state_dict_(model: nn.Module, state_dict: Mapping[str, torch.Tensor], fmt: str = "gptq",
                          zeros_minus_one: bool = True) -> list[str]:
    """Replace each nn.Linear whose prefix has `qweight`/`qzeros`/`scales` in `state_dict` by an
    Int4Linear holding the converted tensors (bias taken from the state dict when present). Returns the
    names of the replaced modules. `fmt`: "gptq" or "awq"."""
    if fmt not in ("gptq", "awq"):
        raise ValueError(f"fmt must be 'gptq' or 'awq', got {fmt!r}")
    replaced = []
    for name, mod in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if prefix + "qweight" not in state_dict:
            continue
        qw, qz, sc = (state_dict[prefix + k] for k in ("qweight", "qzeros", "scales"))
        if fmt == "gptq":
            qweight, scales, zeros, g = from_gptq(qw, qz, sc, state_dict.get(prefix + "g_idx"), zeros_minus_one)
        else:
            qweight, scales, zeros, g = from_awq(qw, qz, sc)
        bias = state_dict.get(prefix + "bias")
        if isinstance(mod, nn.Linear) and (mod.in_features, mod.out_features) != (qweight.shape[1] * 8,
                                                                                   qweight.shape[0]):
            raise ValueError(f"{name}: checkpoint holds a [{qweight.shape[0]}, {qweight.shape[1] * 8}] weight, "
                             f"module is [{mod.out_features}, {mod.in_features}]")
        if g not in GROUP_SIZES:
            raise ValueError(f"{name}: group size {g} not supported; valid: {GROUP_SIZES}")
        new = Int4Linear.from_packed(qweight, scales, zeros, g, bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced.append(name)
    return replaced


__all__ = ["Int4Linear", "n_contiguous", "pack_adjacent", "linears_sharing_input", "pack_shared_input_linears_", "quantize_int4_", "quantize_weight", "pack_int4", "unpack_int4", "dequantize_int4",
           "from_gptq", "from_awq", "load_int4_state_dict_", "AWQ_ORDER", "GROUP_SIZES"]
