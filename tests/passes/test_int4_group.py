"""Grouped int4 linears: `pack_adjacent` (shared buffers, forwards unchanged), `kernopt.int4_linear_group`
(one launch over adjacent weights, per-part launches otherwise, both equal to the separate int4_linear calls),
and the int4 pass grouping int4_linear nodes of one x (and leaving alone those it must not group)."""
import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernopt
from kernopt import ops
from kernopt.int4 import Int4Linear, linears_sharing_input, pack_adjacent
from kernopt.tolerance import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.float16
K, G = 64, 32
WIDTHS = (40, 24, 24)  # not multiples of the kernels' BLOCK_N


def _linears(widths=WIDTHS, symmetric=False, bias=(True, True, False), k=K, g=G, device=DEV):
    return [Int4Linear.from_linear(nn.Linear(k, n, bias=b).to(DT), g, symmetric=symmetric).to(device)
            for n, b in zip(widths, bias)]


def _storage(t):
    return t.untyped_storage().data_ptr()


def _group_rewrites(report):
    return [r for r in report.rewrites if r.pass_name == "int4_group"]


@pytest.fixture
def launches(monkeypatch):
    """How many int4 kernel launches the ops made (each call of ops._int4_gemm_tuned is one), with their N."""
    seen = []
    real = ops._int4_gemm_tuned

    def counting(x2, qweight, scales, *args, **kwargs):
        seen.append(scales.shape[0])
        return real(x2, qweight, scales, *args, **kwargs)

    monkeypatch.setattr(ops, "_int4_gemm_tuned", counting)
    return seen


# --------------------------------------------------------------------------------------------------
# pack_adjacent
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bias", [(True, True, True), (True, False, True)])
def test_pack_adjacent_keeps_every_forward_and_frees_the_old_tensors(symmetric, bias):
    mods = _linears(symmetric=symmetric, bias=bias)
    x = torch.randn(3, 5, K, dtype=DT, device=DEV)
    with torch.no_grad():
        want = [m(x) for m in mods]
    old = [weakref.ref(t) for m in mods for t in (m.qweight, m.scales, m.zeros) if t is not None]
    q_all, s_all, z_all = pack_adjacent(mods)
    gc.collect()
    assert all(r() is None for r in old)  # memory-neutral: nothing keeps the old tensors
    with torch.no_grad():
        got = [m(x) for m in mods]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    total = sum(WIDTHS)
    assert q_all.shape == (total, K // 8) and s_all.shape == (total, K // G)
    assert (z_all is None) == symmetric
    for name in ("qweight", "scales") + (() if symmetric else ("zeros",)):
        parts = [getattr(m, name) for m in mods]
        assert len({_storage(p) for p in parts}) == 1
        assert all(p.stride() == (1, total) for p in parts)  # still N-contiguous, inside the shared buffer
        combined = ops.adjacent_view(parts)
        assert combined is not None and torch.equal(combined, torch.cat(parts))
    if all(bias):  # packed like the weights
        assert len({_storage(m.bias) for m in mods}) == 1 and ops.adjacent_view([m.bias for m in mods]) is not None
    else:  # kept per module
        assert [m.bias is not None for m in mods] == list(bias)
        assert len({_storage(m.bias) for m in mods if m.bias is not None}) == sum(bias)


def test_pack_adjacent_refuses_modules_that_cannot_share():
    a, b = _linears(widths=(16, 16), bias=(False, False))
    with pytest.raises(ValueError, match="group_size"):
        pack_adjacent([a, Int4Linear.from_linear(nn.Linear(K, 16).to(DT), 64).to(DEV)])
    with pytest.raises(ValueError, match="in_features"):
        pack_adjacent([a, Int4Linear.from_linear(nn.Linear(2 * K, 16).to(DT), G, symmetric=False).to(DEV)])
    with pytest.raises(ValueError, match="symmetric"):
        pack_adjacent([a, Int4Linear.from_linear(nn.Linear(K, 16).to(DT), G, symmetric=True).to(DEV)])
    with pytest.raises(TypeError):
        pack_adjacent([a, nn.Linear(K, 16)])


def test_adjacent_view_reads_storage_not_values():
    base = torch.randn(8, 64)  # [K/8, Ntot] row-major: column blocks are N-contiguous parts
    parts = [base[:, :40].t(), base[:, 40:].t()]
    assert torch.equal(ops.adjacent_view(parts), base.t())
    assert ops.adjacent_view(parts[::-1]) is None  # out of order
    assert ops.adjacent_view([parts[0], parts[1].clone()]) is None  # same values, other storage
    assert ops.adjacent_view([base[:, :40].t(), base[:, 41:].t()]) is None  # a gap
    rows = torch.randn(64, 8)  # row-contiguous [N, K/8] parts stored back to back also qualify
    assert torch.equal(ops.adjacent_view([rows[:40], rows[40:]]), rows)
    assert ops.adjacent_view([None, rows]) is None


# --------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------
def _separate(x, mods):
    return torch.cat([torch.ops.kernopt.int4_linear(x, m.qweight, m.scales, m.zeros, m.group_size, m.bias)
                      for m in mods], dim=-1)


def _grouped(x, mods):
    return torch.ops.kernopt.int4_linear_group(x, [m.qweight for m in mods], [m.scales for m in mods],
                                               [m.zeros for m in mods], mods[0].group_size, [m.bias for m in mods])


@pytest.mark.parametrize("adjacent", [True, False])
@pytest.mark.parametrize("symmetric,bias", [(False, (True, True, False)), (True, (False, False, False)),
                                            (False, (True, True, True))])
@pytest.mark.parametrize("lead", [(1,), (3, 5)])
def test_group_op_equals_separate_int4_linears(adjacent, symmetric, bias, lead, launches):
    mods = _linears(symmetric=symmetric, bias=bias)
    if adjacent:
        pack_adjacent(mods)
    x = torch.randn(*lead, K, dtype=DT, device=DEV)
    want = _separate(x, mods)
    launches.clear()
    got = _grouped(x, mods)
    assert got.shape == (*lead, sum(WIDTHS)) and not got.isnan().any()
    if ops.implementation(x) != "reference":
        assert launches == ([sum(WIDTHS)] if adjacent else list(WIDTHS)), launches
    assert_close(got, want.double(), DT, scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 33])
def test_group_op_llama_shapes_on_gpu(m, launches):
    """q/k/v of an 8B layer (N 4096 + 1024 + 1024, K 4096, g128, bf16) in one launch, at decode and small M."""
    mods = [Int4Linear.from_linear(nn.Linear(4096, n, bias=False, device="cuda", dtype=torch.bfloat16), 128)
            for n in (4096, 1024, 1024)]
    pack_adjacent(mods)
    x = torch.randn(m, 4096, dtype=torch.bfloat16, device="cuda")
    want = _separate(x, mods)
    launches.clear()
    got = _grouped(x, mods)
    assert launches == [6144]
    assert_close(got, want.double(), torch.bfloat16, scale=2.0)


def test_group_op_reference_is_the_separate_references(monkeypatch):
    monkeypatch.setenv("KERNOPT_CPU", "reference")
    mods = _linears(device="cpu")
    pack_adjacent(mods)
    x = torch.randn(2, 3, K, dtype=DT)  # on CPU (on a GPU machine too): both run their plain-torch references
    assert torch.equal(_grouped(x, mods), _separate(x, mods))


def test_group_op_registration_and_fake_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mods = _linears(bias=(False, True, False))
    pack_adjacent(mods)
    x = torch.randn(2, K, dtype=DT, device=DEV)
    torch.library.opcheck(torch.ops.kernopt.int4_linear_group.default,
                          (x, [m.qweight for m in mods], [m.scales for m in mods], [m.zeros for m in mods], G,
                           [m.bias for m in mods]))
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = _grouped(torch.empty(4, 7, K, dtype=DT, device=DEV), mods)
    assert out.shape == (4, 7, sum(WIDTHS)) and out.dtype == DT


# --------------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """q/k/v of one x; q reshaped (a view needs packed rows: its slice gets .contiguous()), k/v elementwise."""

    def __init__(self, symmetric=False):
        super().__init__()
        self.q, self.k, self.v = _linears(symmetric=symmetric)

    def forward(self, x):
        q = self.q(x).view(*x.shape[:-1], 5, 8).sum(-1)
        return q, torch.relu(self.k(x)) * self.v(x)


class GatedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up = _linears(widths=(96, 96), bias=(False, False))
        self.down = _linears(widths=(K,), bias=(False,), k=96)[0]

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _compile_and_compare(model, x, launches, expect_launches):
    with torch.no_grad():
        want = model(x)
    torch._dynamo.reset()
    report = kernopt.explain(model, x, options={"inner": "eager"})
    assert not [f for f in report.fallbacks if "raised" in f.reason], report.table()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="kernopt", options={"inner": "eager"})
    with torch.no_grad():
        compiled(x)  # compile
        launches.clear()
        got = compiled(x)
    if ops.implementation(x) != "reference":
        assert launches == expect_launches, launches
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert_close(g, w.double(), DT, scale=2.0)
    return report


@pytest.mark.parametrize("packed", [True, False])
def test_pass_groups_three_linears_of_one_input(packed, launches):
    model = Attention()
    if packed:
        pack_adjacent([model.q, model.k, model.v])
    report = _compile_and_compare(model, torch.randn(2, 3, K, dtype=DT, device=DEV), launches,
                                  [sum(WIDTHS)] if packed else list(WIDTHS))
    groups = _group_rewrites(report)
    assert len(groups) == 1 and groups[0].kernel == "kernopt.int4_linear_group", report.table()
    assert "3 int4_linear" in groups[0].matched and "N=40+24+24" in groups[0].matched
    if ops.implementation(torch.empty(0, dtype=DT, device=DEV)) != "reference":
        assert groups[0].config.startswith("one launch" if packed else "weights not in one storage"), groups[0].config


def test_pass_groups_gate_and_up_and_leaves_down_alone(launches):
    model = GatedMLP()
    pack_adjacent([model.gate, model.up])
    report = _compile_and_compare(model, torch.randn(1, K, dtype=DT, device=DEV), launches, [192, K])
    groups = _group_rewrites(report)
    assert len(groups) == 1 and "N=96+96" in groups[0].matched, report.table()


def _swiglu_rewrites(report):
    return [r for r in report.rewrites if r.pass_name == "int4_swiglu"]


@pytest.mark.parametrize("rows", [1, 3])
def test_pass_fuses_swiglu_into_the_gate_up_launch(monkeypatch, launches, rows):
    """KERNOPT_INT4_SWIGLU=1: silu(gate) * up over the grouped gate/up -> one kernopt.int4_swiglu (one launch over
    both, the silu * mul in its epilogue at one row); the output is the eager module's."""
    monkeypatch.setenv("KERNOPT_INT4_SWIGLU", "1")
    model = GatedMLP()
    pack_adjacent([model.gate, model.up])
    report = _compile_and_compare(model, torch.randn(rows, K, dtype=DT, device=DEV), launches, [192, K])
    fused = _swiglu_rewrites(report)
    assert len(fused) == 1 and fused[0].kernel == "kernopt.int4_swiglu" and "N=96" in fused[0].matched, report.table()
    if ops.implementation(torch.empty(0, dtype=DT, device=DEV)) != "reference":
        assert fused[0].config.startswith("in the GEMV's epilogue" if rows == 1 else "grouped product"), fused[0].config


def test_pass_swiglu_on_by_default_off_when_asked_and_unpacked_parts(monkeypatch, launches):
    """On unless KERNOPT_INT4_SWIGLU=0; with gate/up not in one storage, the op runs each part's launch, then
    silu * mul (still the module's output)."""
    monkeypatch.delenv("KERNOPT_INT4_SWIGLU", raising=False)
    model = GatedMLP()
    report = _compile_and_compare(model, torch.randn(1, K, dtype=DT, device=DEV), launches, [96, 96, K])
    assert len(_swiglu_rewrites(report)) == 1, report.table()
    monkeypatch.setenv("KERNOPT_INT4_SWIGLU", "0")
    report = _compile_and_compare(model, torch.randn(1, K, dtype=DT, device=DEV), launches, [96, 96, K])
    assert not _swiglu_rewrites(report) and _group_rewrites(report), report.table()
    monkeypatch.setenv("KERNOPT_INT4_SWIGLU", "yes")
    with pytest.raises(ValueError, match="KERNOPT_INT4_SWIGLU"):
        from kernopt.passes.int4 import swiglu_enabled
        swiglu_enabled()


class GatedMLPSharedAct(GatedMLP):
    """silu(gate) is also returned: fusing would have to compute it twice; left as it is."""

    def forward(self, x):
        act = F.silu(self.gate(x))
        return self.down(act * self.up(x)), act


def test_pass_swiglu_leaves_alone_an_activation_used_elsewhere(monkeypatch, launches):
    monkeypatch.setenv("KERNOPT_INT4_SWIGLU", "1")
    model = GatedMLPSharedAct()
    pack_adjacent([model.gate, model.up])
    report = _compile_and_compare(model, torch.randn(1, K, dtype=DT, device=DEV), launches, [192, K])
    assert not _swiglu_rewrites(report) and _group_rewrites(report), report.table()
    assert [f for f in report.fallbacks if f.pass_name == "int4_swiglu" and "other uses" in f.reason], report.table()


def test_swiglu_op_registration_reference_and_fake_shape(monkeypatch):
    gate, up = _linears(widths=(24, 24), bias=(True, True))
    pack_adjacent([gate, up])
    x = torch.randn(2, 3, K, dtype=DT, device=DEV)
    args = (x, [gate.qweight, up.qweight], [gate.scales, up.scales], [gate.zeros, up.zeros], G, [gate.bias, up.bias])
    with torch.no_grad():
        want = F.silu(gate(x)) * up(x)
    got = torch.ops.kernopt.int4_swiglu(*args)
    assert got.shape == (2, 3, 24)
    assert_close(got, want.double(), DT, scale=2.0)
    monkeypatch.setenv("KERNOPT_CPU", "reference")
    if ops.implementation(x) == "reference":
        assert_close(torch.ops.kernopt.int4_swiglu(*args), want.double(), DT, scale=2.0)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.kernopt.int4_swiglu(torch.empty(5, K, dtype=DT, device=DEV), *args[1:])
    assert fake.shape == (5, 24)
    with pytest.raises(ValueError, match="two parts"):
        torch.ops.kernopt.int4_swiglu(x, [gate.qweight], [gate.scales], [gate.zeros], G, [gate.bias])


class DifferentInputs(nn.Module):
    """a(x), b(y): different inputs; c(a(x)): one linear's output feeds another (same widths and K)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = _linears(widths=(K, K, K), bias=(False, False, False))
        self.d = Int4Linear.from_linear(nn.Linear(K, 16).to(DT), 64, symmetric=False).to(DEV)  # other group size

    def forward(self, x, y):
        h = self.a(x)
        return self.c(h) + self.b(y), self.d(x)


def test_pass_leaves_alone_what_does_not_share_an_input(launches):
    model = DifferentInputs()
    pack_adjacent([model.a, model.b, model.c])  # adjacent storage alone is no reason to group
    x, y = (torch.randn(2, K, dtype=DT, device=DEV) for _ in range(2))
    with torch.no_grad():
        want = model(x, y)
    report = kernopt.explain(model, x, y, options={"inner": "eager"})
    assert len([r for r in report.rewrites if r.pass_name == "int4"]) == 4, report.table()
    assert not _group_rewrites(report), report.table()
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="kernopt", options={"inner": "eager"})(x, y)
    for g, w in zip(got, want):
        assert_close(g, w.double(), DT, scale=2.0)


class BiasFromOutput(nn.Module):
    """b reads the same x as a, but its bias is computed from a's output: one node cannot compute both."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _linears(widths=(K, K), bias=(False, False))

    def forward(self, x):
        from kernopt.kernels.int4_gemm import int4_gemm_ref

        ya = self.a(x)
        return int4_gemm_ref(x, self.b.qweight, self.b.scales, self.b.zeros, G, bias=ya.sum(0))


def test_pass_does_not_group_a_linear_that_depends_on_another(launches):
    model = BiasFromOutput()
    pack_adjacent([model.a, model.b])
    report = _compile_and_compare(model, torch.randn(3, K, dtype=DT, device=DEV), launches, [K, K])
    assert len([r for r in report.rewrites if r.pass_name == "int4"]) == 2, report.table()
    assert not _group_rewrites(report), report.table()


def test_pass_grouping_switched_off_by_env(monkeypatch):
    monkeypatch.setenv("KERNOPT_INT4_GROUP", "0")
    model = Attention(symmetric=True)
    report = kernopt.explain(model, torch.randn(2, K, dtype=DT, device=DEV), options={"inner": "eager"})
    assert len([r for r in report.rewrites if r.pass_name == "int4"]) == 3 and not _group_rewrites(report)


# --------------------------------------------------------------------------------------------------
# Which linears share an input
# --------------------------------------------------------------------------------------------------
def test_linears_sharing_input_traced_and_by_name():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, 8) for _ in range(3))
            self.w1, self.w3, self.w2 = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            h = self.q_proj(x) + self.k_proj(x) * self.v_proj(x)
            return self.w2(self.w1(h) * self.w3(h))

    model = nn.Sequential(Block(), Block())
    traced = linears_sharing_input(model, lambda: model(torch.randn(2, 8)))
    assert traced == [[f"{i}.q_proj", f"{i}.k_proj", f"{i}.v_proj"] for i in (0,)] + [["0.w1", "0.w3"]] + \
        [[f"{i}.q_proj", f"{i}.k_proj", f"{i}.v_proj"] for i in (1,)] + [["1.w1", "1.w3"]]

    def broken():
        raise TypeError("needs other inputs")

    by_name = linears_sharing_input(model, broken)  # falls back to the sibling names it knows
    assert by_name == [["0.q_proj", "0.k_proj", "0.v_proj"], ["1.q_proj", "1.k_proj", "1.v_proj"]]


# --------------------------------------------------------------------------------------------------
# GEMV launches read x in float32 (float_gemv_inputs)
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def x_dtypes(monkeypatch):
    """The x dtype of every int4 kernel launch the ops made."""
    seen = []
    real = ops._int4_gemm_tuned

    def recording(x2, *args, **kwargs):
        seen.append(x2.dtype)
        return real(x2, *args, **kwargs)

    monkeypatch.setattr(ops, "_int4_gemm_tuned", recording)
    return seen


def _float_x_rewrites(report):
    return [r for r in report.rewrites if r.pass_name == "int4_float_x"]


def _compiled_out(model, x, seen):
    """The second call's output of the model compiled afresh; `seen` cleared in between."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="kernopt", options={"inner": "eager"})
    with torch.no_grad():
        compiled(x)
        seen.clear()
        return compiled(x)


@pytest.mark.skipif(ops.implementation(torch.empty(0, dtype=DT, device=DEV)) == "reference",
                    reason="the kernels' x dtype only matters where the kernels run")
def test_gemv_launches_read_float_x_with_the_same_output(monkeypatch, x_dtypes):
    """At one row (the GEMV), the grouped gate/up and the down projection take x.float(); the output is the
    very same as with x in fp16 (exact conversion, fp32 accumulation either way, one rounding at the end)."""
    from kernopt.kernels.int4_gemm import GEMV_MAX_M

    monkeypatch.setenv("KERNOPT_INT4_SWIGLU", "0")  # the fused op keeps x's dtype (it rounds as the unfused ops do)
    model = GatedMLP()
    pack_adjacent([model.gate, model.up])
    x = torch.randn(GEMV_MAX_M, K, dtype=DT, device=DEV)
    torch._dynamo.reset()
    report = kernopt.explain(model, x, options={"inner": "eager"})
    rewrites = _float_x_rewrites(report)
    assert sorted(r.kernel for r in rewrites) == ["kernopt.int4_linear", "kernopt.int4_linear_group"], \
        report.table()
    got = _compiled_out(model, x, x_dtypes)
    assert x_dtypes == [torch.float32, torch.float32] and got.dtype == DT
    monkeypatch.setenv("KERNOPT_INT4_FLOAT_X", "0")
    plain = _compiled_out(model, x, x_dtypes)
    assert x_dtypes == [DT, DT]
    assert torch.equal(got, plain)
    with torch.no_grad():
        assert_close(got, model(x).double(), DT, scale=2.0)


def test_float_x_leaves_alone_more_rows_than_the_gemv_and_the_reference(monkeypatch, x_dtypes):
    import kernopt.kernels.int4_gemm as kmod
    from kernopt.kernels.int4_gemm import GEMV_MAX_M

    model = GatedMLP()
    pack_adjacent([model.gate, model.up])
    report = kernopt.explain(model, torch.randn(GEMV_MAX_M + 2, K, dtype=DT, device=DEV), options={"inner": "eager"})
    assert _group_rewrites(report) and not _float_x_rewrites(report), report.table()
    if DEV == "cpu":  # bf16 on CPU runs the plain-torch reference: its dtype is left as it is
        report = kernopt.explain(model.to(torch.bfloat16), torch.randn(1, K, dtype=torch.bfloat16),
                                 options={"inner": "eager"})
        assert _group_rewrites(report) and not _float_x_rewrites(report), report.table()
    if ops.implementation(torch.empty(0, dtype=DT, device=DEV)) != "reference":
        # a table impl that takes 16-bit x only (tcasm): the GEMV rows keep their dtype too
        monkeypatch.setattr(kmod, "FLOAT_X_IMPLS", ())
        torch._dynamo.reset()
        report = kernopt.explain(model.to(DT), torch.randn(1, K, dtype=DT, device=DEV), options={"inner": "eager"})
        assert _group_rewrites(report) and not _float_x_rewrites(report), report.table()


@pytest.mark.skipif(ops.implementation(torch.empty(0, dtype=DT, device=DEV)) == "reference",
                    reason="the kernels' x dtype only matters where the kernels run")
@pytest.mark.parametrize("variant", ["planes", "tcasm"])
def test_gemv_variant_keeps_x_dtype_for_symmetric_weights(monkeypatch, x_dtypes, variant):
    """The decode GEMV experiment (KERNOPT_INT4_GEMV, kernels/int4_gemm.py) reads 16-bit x: with symmetric weights
    the float32-x rewrite stays away and the output is still right; weights with zero points keep float32 x."""
    from kernopt.kernels.int4_gemm import GEMV_VARIANT_ENV

    class SymMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up = _linears(widths=(96, 96), symmetric=True, bias=(False, False))
            self.down = _linears(widths=(K,), symmetric=True, bias=(False,), k=96)[0]

        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x))

    monkeypatch.setenv(GEMV_VARIANT_ENV, variant)
    monkeypatch.setenv("KERNOPT_INT4_SWIGLU", "0")  # the float32-x rewrite is over the unfused gate/up launch
    x = torch.randn(1, K, dtype=DT, device=DEV)
    for model, floats in ((SymMLP(), False), (GatedMLP(), True)):
        pack_adjacent([model.gate, model.up])
        torch._dynamo.reset()
        report = kernopt.explain(model, x, options={"inner": "eager"})
        assert bool(_float_x_rewrites(report)) == floats, report.table()
        got = _compiled_out(model, x, x_dtypes)
        assert x_dtypes == ([torch.float32] * 2 if floats else [DT, DT])
        with torch.no_grad():
            assert_close(got, model(x).double(), DT, scale=2.0)


def test_float_x_only_for_the_fp32_gemv(monkeypatch):
    """bf16 x at M=1 runs gemv2 PAIRS (packed bf16 math), so the pass leaves it bf16; fp16 x (and bf16 under
    KERNOPT_INT4_GEMV=fp32) runs the fp32 path, which gets x.float(); no rewrite past the GEMV's rows."""
    from kernopt.kernels.int4_gemm import GEMV_VARIANT_ENV
    from kernopt.passes.int4 import gemv_takes_float_x

    for sym in (True, False):
        assert not gemv_takes_float_x(1, 14336, 4096, 128, torch.bfloat16, symmetric=sym)
        assert gemv_takes_float_x(1, 14336, 4096, 128, torch.float16, symmetric=sym)
        assert not gemv_takes_float_x(2, 14336, 4096, 128, torch.float16, symmetric=sym)
    monkeypatch.setenv(GEMV_VARIANT_ENV, "fp32")
    assert gemv_takes_float_x(1, 14336, 4096, 128, torch.bfloat16)
