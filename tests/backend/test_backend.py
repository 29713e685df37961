"""The backend: registration, options, the pass pipeline's safety nets, verify, explain."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernopt
from kernopt.backend import KernoptError, parse_options
from kernopt.tolerance import assert_close


class MLP(nn.Module):
    def __init__(self, d=24, h=40):
        super().__init__()
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d)
        self.proj = nn.Linear(d, h)

    def forward(self, x):
        y = self.down(F.silu(self.gate(x)) * self.up(x))
        return y, F.gelu(self.proj(y), approximate="tanh")


def _compile(m, **options):
    return torch.compile(m, backend="kernopt", options=options or None)


def test_entry_point_without_import():
    code = textwrap.dedent("""
        import sys, torch
        f = torch.compile(lambda x: x @ x, backend="kernopt")
        x = torch.randn(5, 5)
        torch.testing.assert_close(f(x), x @ x)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_kernels_package_is_not_top_level():
    # transformers probes for the Hugging Face `kernels` package; ours must not answer to that name.
    out = subprocess.run([sys.executable, "-c", "import kernels"], capture_output=True, text=True, cwd="/")
    assert out.returncode != 0


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_mlp_rewritten_and_equal(inner):
    m = MLP().eval()
    x = torch.randn(3, 7, 24)
    report = kernopt.explain(m, x, options={"inner": inner})
    matched = [r.matched for r in report.rewrites]
    assert any("swiglu" in s for s in matched), report
    assert any("gelu_tanh" in s for s in matched), report
    assert {r.kernel for r in report.rewrites} == {"kernopt.linear"}
    with torch.no_grad():
        got = _compile(m, inner=inner)(x)
        want = m(x)
    for g, w in zip(got, want):
        assert_close(g, w.double())


def test_float64_is_left_alone_with_reason():
    m = MLP().double().eval()
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    report = kernopt.explain(m, x)
    assert report.rewrites == []
    reasons = [f.reason for f in report.fallbacks if f.pass_name == "matmul"]
    assert reasons and all("float64" in r for r in reasons), report
    assert "float64" in str(report)


def test_unknown_option_is_a_clear_error():
    with pytest.raises(ValueError, match="valid options: scenario, inner, passes, verify, mode"):
        parse_options({"scenaro": "offline"})
    with pytest.raises(ValueError, match="valid: 'auto'"):
        parse_options({"scenario": "batch"})
    with pytest.raises(ValueError, match="valid: attention"):
        parse_options({"passes": {"matmull": False}})
    with pytest.raises(ValueError, match="unknown mode"):
        parse_options(None, mode="fastest")
    with pytest.raises(ValueError, match="unknown mode"):
        parse_options({"mode": "fastest"})
    with pytest.raises(ValueError, match="disagree"):
        parse_options({"mode": "max-autotune"}, mode="reduce-overhead")
    assert parse_options({"mode": "reduce-overhead"})["mode"] == "reduce-overhead"
    with pytest.raises(Exception, match="unknown option"):
        torch.compile(lambda x: x + 1, backend="kernopt", options={"bogus": 1})(torch.randn(2))


def test_passes_option_switches_off():
    m = MLP().eval()
    x = torch.randn(2, 24)
    assert kernopt.explain(m, x, options={"passes": {"matmul": False}}).rewrites == []
    assert kernopt.explain(m, x, options={"passes": ["matmul"]}).rewrites


def test_scenario_override_shows_in_report():
    m = MLP().eval()
    report = kernopt.explain(m, torch.randn(2, 24), options={"scenario": "offline"})
    assert report.rewrites and {r.scenario for r in report.rewrites} == {"offline"}


def test_verify_names_the_pass(monkeypatch):
    gemm = kernopt.ops.kernel_module("gemm")
    ref = gemm.gemm_ref
    wrong = lambda x, w, bias=None, w_up=None, activation="none", **kw: 1.5 * ref(x, w, bias, w_up, activation)
    monkeypatch.setattr(gemm, "gemm_ref", wrong)
    monkeypatch.setattr(gemm, "gemm", wrong)
    m = MLP().eval()
    with torch.no_grad(), pytest.raises(Exception, match="verify.*matmul"):
        _compile(m, verify=True, inner="eager")(torch.randn(2, 24))


def test_verify_passes_when_correct():
    m = MLP().eval()
    x = torch.randn(4, 24)
    with torch.no_grad():
        got = _compile(m, verify=True, inner="eager")(x)
    assert_close(got[0], m(x)[0].detach().double())


def test_crashing_pass_leaves_graph_intact(monkeypatch):
    from kernopt.passes import matmul

    def boom(self, gm, ctx):
        for n in list(gm.graph.nodes):  # half-done damage before the crash
            if n.op == "call_function":
                n.args = ()
                break
        raise RuntimeError("bug in pass")

    monkeypatch.setattr(matmul.MatmulPass, "__call__", boom)
    m = MLP().eval()
    x = torch.randn(2, 24)
    report = kernopt.explain(m, x, options={"inner": "eager"})
    assert report.rewrites == []
    assert any("bug in pass" in f.reason for f in report.fallbacks)
    with torch.no_grad():
        assert_close(_compile(m, inner="eager")(x)[0], m(x)[0].double())


def test_autograd_graph_left_alone():
    m = MLP()
    report = kernopt.explain(m, torch.randn(2, 24))  # explain runs under no_grad: rewritten
    assert report.rewrites
    x = torch.randn(2, 24)
    y = _compile(m, inner="eager")(x)[0]  # grad mode: untouched, and backward works
    y.sum().backward()
    assert m.gate.weight.grad is not None


def test_combo_kernels_switch_reaches_inductor(monkeypatch):
    """Unset, Inductor gets combo_kernels=True beside the mode's options for graphs with CUDA inputs and the mode's
    options alone otherwise; KERNOPT_INDUCTOR_COMBO=1 turns them on for every graph, =0 off (the llama suite's
    kernopt_int4_nocombo); anything but 0/1 is a clear error."""
    import torch._inductor.compile_fx as cfx

    from kernopt import backend

    seen = []
    monkeypatch.setattr(cfx, "compile_fx", lambda gm, ex, config_patches=None: seen.append(config_patches) or gm)
    gm = torch.fx.symbolic_trace(nn.Linear(3, 3))
    opts = parse_options({"mode": "reduce-overhead"})
    monkeypatch.delenv(backend.COMBO_ENV, raising=False)
    backend._inner(gm, [torch.zeros(1)], opts)
    monkeypatch.setattr(backend, "_on_cuda", lambda inputs: True)
    backend._inner(gm, [], opts)
    monkeypatch.setenv(backend.COMBO_ENV, "0")
    backend._inner(gm, [], opts)
    monkeypatch.undo()
    monkeypatch.setattr(cfx, "compile_fx", lambda gm, ex, config_patches=None: seen.append(config_patches) or gm)
    monkeypatch.setenv(backend.COMBO_ENV, "1")
    backend._inner(gm, [torch.zeros(1)], opts)
    backend._inner(gm, [], parse_options(None))
    assert "combo_kernels" not in seen[0] and seen[0]["triton.cudagraphs"]
    assert seen[1] == {**seen[0], "combo_kernels": True} and seen[2] == seen[0]
    assert seen[3] == {**seen[0], "combo_kernels": True} and seen[4] == {"combo_kernels": True}
    monkeypatch.setenv(backend.COMBO_ENV, "yes")
    with pytest.raises(ValueError, match=backend.COMBO_ENV):
        backend._inner(gm, [], opts)
