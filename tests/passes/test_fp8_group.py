"""Grouped fp8 linears: `kernopt.fp8.pack_adjacent` (shared buffers, forwards unchanged),
`kernopt.fp8_linear_prequant_group` (one launch over adjacent weights, per-part launches otherwise, both equal to the
separate fp8_linear_prequant calls), and the fp8 pass grouping the linears of one rmsnorm_quant_fp8."""
import gc
import weakref

import pytest
import torch
import torch.nn as nn

import kernopt
from kernopt.fp8 import Fp8Linear, pack_adjacent, pack_shared_input_linears_, quantize_fp8_
from kernopt.kernels import fp8_gemm
from kernopt.kernels.fp8_gemm import quantize_rows_fp8_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
K = 64
WIDTHS = (40, 24, 24)  # not multiples of the kernels' BLOCK_N


def _linears(widths=WIDTHS, bias=(True, True, False), dtype=torch.float32):
    torch.manual_seed(0)
    return [Fp8Linear.from_linear(nn.Linear(K, n, bias=b).to(dtype)).to(DEV) for n, b in zip(widths, bias)]


def _storage(t):
    return t.untyped_storage().data_ptr()


def _ref64(q, s, mods):
    """float64 (codes @ w.T) * x_scale * w_scale + bias, each part in turn, concatenated."""
    outs = []
    for m in mods:
        y = (q.double() @ m.weight.double().t()) * s.double() * m.weight_scale.double().reshape(1, -1)
        outs.append(y + m.bias.double() if m.bias is not None else y)
    return torch.cat(outs, dim=-1)


@pytest.fixture
def launches(monkeypatch):
    """The N of every fp8_linear_prequant kernel call the ops made."""
    seen = []
    real = fp8_gemm.fp8_linear_prequant

    def counting(x, x_scale, w, w_scale, *args, **kwargs):
        seen.append(w.shape[0])
        return real(x, x_scale, w, w_scale, *args, **kwargs)

    monkeypatch.setattr(fp8_gemm, "fp8_linear_prequant", counting)
    return seen


@pytest.mark.parametrize("bias", [(True, True, True), (True, False, True)])
def test_pack_adjacent_keeps_every_forward_and_frees_the_old_tensors(bias):
    mods = _linears(bias=bias)
    x = torch.randn(3, 5, K, device=DEV)
    with torch.no_grad():
        want = [m(x) for m in mods]
    old = [weakref.ref(t) for m in mods for t in (m.weight, m.weight_scale)]
    w_all, s_all = pack_adjacent(mods)
    gc.collect()
    assert all(r() is None for r in old)  # memory-neutral: nothing keeps the old tensors
    with torch.no_grad():
        got = [m(x) for m in mods]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert w_all.shape == (sum(WIDTHS), K) and w_all.dtype == torch.float8_e4m3fn and s_all.shape == (sum(WIDTHS),)
    for name in ("weight", "weight_scale"):
        parts = [getattr(m, name) for m in mods]
        assert len({_storage(p) for p in parts}) == 1
        combined = kernopt.ops.adjacent_view(parts)
        assert combined is not None and torch.equal(combined.float(), torch.cat(parts).float())
    if all(bias):
        assert kernopt.ops.adjacent_view([m.bias for m in mods]) is not None
    else:
        assert [m.bias is not None for m in mods] == list(bias)
    assert dict(mods[0].named_buffers())["weight"] is mods[0].weight  # still the module's buffer (state_dict)


def test_pack_adjacent_refuses_modules_that_cannot_share():
    a, b = _linears(widths=(16, 16), bias=(False, False))
    c = Fp8Linear.from_linear(nn.Linear(K + 16, 8)).to(DEV)
    with pytest.raises(ValueError, match="in_features differs"):
        pack_adjacent([a, c])
    with pytest.raises(TypeError, match="not an Fp8Linear"):
        pack_adjacent([a, nn.Linear(K, 4)])
    with pytest.raises(ValueError, match="no modules"):
        pack_adjacent([])
    model = nn.ModuleDict({"a": a, "b": b, "c": c})
    assert pack_shared_input_linears_(model, [["a", "c"], ["a", "b", "c"]]) == [["a", "b"]]
    assert _storage(a.weight) == _storage(b.weight) != _storage(c.weight)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [(True, True, True), (True, False, False), (False, False, False)])
def test_group_op_matches_the_parts(packed, rows, out_dtype, bias, launches):
    mods = _linears(bias=bias, dtype=out_dtype)
    if packed:
        pack_adjacent(mods)
    q, s = quantize_rows_fp8_ref(torch.randn(rows, K, device=DEV))
    ws, scales, biases = [m.weight for m in mods], [m.weight_scale for m in mods], [m.bias for m in mods]
    got = torch.ops.kernopt.fp8_linear_prequant_group(q, s, ws, scales, biases, out_dtype)
    assert got.shape == (rows, sum(WIDTHS)) and got.dtype == out_dtype and not torch.isnan(got).any()
    ref = _ref64(q, s, mods)
    mag = float(((q.double().abs() @ torch.cat(ws).double().abs().t()) * s.double()).max())
    tol = (1e-5 if out_dtype == torch.float32 else 1e-3) * mag + 1e-6
    assert float((got.double() - ref).abs().max()) <= tol
    parts = [torch.ops.kernopt.fp8_linear_prequant(q, s, w, sc, b, out_dtype) for w, sc, b in zip(ws, scales, biases)]
    if kernopt.ops.implementation(q) != "reference" and out_dtype != torch.bfloat16:
        assert launches[:-3] == ([sum(WIDTHS)] if packed else list(WIDTHS))  # one launch, or one per part
    if not packed:  # per-part launches into the one output: the separate calls' very values
        assert torch.equal(got, torch.cat(parts, dim=-1))


def test_group_op_leading_dims():
    mods = _linears()
    pack_adjacent(mods)
    q, s = quantize_rows_fp8_ref(torch.randn(6, K, device=DEV))
    got = torch.ops.kernopt.fp8_linear_prequant_group(q.reshape(2, 3, K), s, [m.weight for m in mods],
                                                       [m.weight_scale for m in mods], [m.bias for m in mods],
                                                       torch.float32)
    flat = torch.ops.kernopt.fp8_linear_prequant_group(q, s, [m.weight for m in mods], [m.weight_scale for m in mods],
                                                        [m.bias for m in mods], torch.float32)
    assert got.shape == (2, 3, sum(WIDTHS)) and torch.equal(got.reshape(6, -1), flat)


class NormQKV(nn.Module):
    """input_layernorm -> q/k/v, their outputs reshaped as attention heads would be (a non-elementwise user)."""

    def __init__(self, d=K):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(d, eps=1e-6)
        with torch.no_grad():
            self.norm.weight.copy_(1 + 0.5 * torch.randn(d))
        self.q, self.k, self.v = nn.Linear(d, 32, bias=False), nn.Linear(d, 16, bias=False), nn.Linear(d, 16)

    def forward(self, x):
        h = self.norm(x)
        q = self.q(h).view(*x.shape[:-1], 4, 8)
        return torch.cat([q.flatten(-2), self.k(h) * 2, self.v(h)], dim=-1)


@pytest.mark.parametrize("grouping", ["1", "0"])
@pytest.mark.parametrize("packed", [True, False])
def test_fp8_pass_groups_the_linears_of_one_norm(grouping, packed, monkeypatch):
    monkeypatch.setenv("KERNOPT_FP8_GROUP", grouping)
    torch.manual_seed(0)
    m = quantize_fp8_(NormQKV(), skip=()).to(DEV)
    if packed:
        pack_adjacent([m.q, m.k, m.v])
    x = torch.randn(2, 3, K, device=DEV)
    report = kernopt.explain(m, x, options={"inner": "eager"})
    assert not [fb for fb in report.fallbacks if "error" in fb.reason.lower()], report.table()
    grouped = [r for r in report.rewrites if r.pass_name == "fp8_group"]
    assert len([r for r in report.rewrites if r.kernel == "kernopt.fp8_linear_prequant"]) == 3, report.table()
    if grouping == "0":
        assert grouped == [], report.table()
    else:
        assert len(grouped) == 1 and grouped[0].kernel == "kernopt.fp8_linear_prequant_group", report.table()
        assert grouped[0].matched.startswith("3 fp8_linear_prequant of one input") and "N=32+16+16" in \
            grouped[0].matched, report.table()
        if grouped[0].implementation != "reference":
            assert grouped[0].config.startswith("one launch" if packed else "weights not in one storage"), \
                report.table()
    torch._dynamo.reset()
    with torch.no_grad():  # (a graph that needs gradients keeps its plain ops)
        got = torch.compile(m, backend="kernopt", options={"inner": "eager"})(x)
        want = m(x)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))


def test_group_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("KERNOPT_FP8_GROUP", "yes")
    with pytest.raises(ValueError, match="KERNOPT_FP8_GROUP"):
        kernopt.fp8.grouping_enabled()
