"""The fp8 pass: fp8 matmul subgraphs written in plain torch -> kernopt.fp8_linear / kernopt.fp8_scaled_mm."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernopt
from kernopt.fp8 import Fp8Linear, quantize_fp8_
from kernopt.kernels.fp8_gemm import fp8_linear_ref, fp8_scaled_mm_ref, quantize_rows_fp8_ref, quantize_weight_fp8

E4M3 = torch.float8_e4m3fn
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _close(got, want, rel=1e-3):
    scale = want.abs().max().clamp(min=1e-6)
    assert not torch.isnan(got).any()
    assert ((got.float() - want.float()).abs().max() / scale).item() <= rel, \
        f"max rel err {((got.float() - want.float()).abs().max() / scale).item():.3g}"


def _fp8_rewrites(report, kernel=None):
    return [r for r in report.rewrites if r.pass_name == "fp8" and (kernel is None or r.kernel == kernel)]


def _no_pass_errors(report):
    assert not [f for f in report.fallbacks if "raised" in f.reason], report.table()


class Block(nn.Module):
    def __init__(self, d=48, h=64):
        super().__init__()
        self.up = nn.Linear(d, h, bias=True)
        self.down = nn.Linear(h, d, bias=False)
        self.lm_head = nn.Linear(d, 40, bias=False)

    def forward(self, x):
        return self.lm_head(self.down(F.silu(self.up(x))))


def test_quantize_fp8_swaps_linears_and_skips_lm_head():
    m = Block().to(DEV)
    x = torch.randn(2, 5, 48, device=DEV)
    want = m(x)
    quantize_fp8_(m)
    assert isinstance(m.up, Fp8Linear) and isinstance(m.down, Fp8Linear)
    assert isinstance(m.lm_head, nn.Linear) and not isinstance(m.lm_head, Fp8Linear)
    # a later dtype cast of the model keeps the codes e4m3 and the scales fp32; the bias follows the model
    m.half()
    assert m.up.weight.dtype == E4M3 and m.up.weight_scale.dtype == torch.float32 and m.up.bias.dtype == torch.half
    m.float()
    assert m.up.weight.dtype == E4M3 and m.up.weight_scale.shape == (64,) and m.up.bias is not None
    # eager forward is the op's reference, and close to the float model
    x2 = x.reshape(-1, 48)
    torch.testing.assert_close(m.up(x2), fp8_linear_ref(x2, m.up.weight, m.up.weight_scale, m.up.bias))
    _close(m(x), want, rel=0.08)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_linear_module_becomes_fp8_linear_op(dtype):
    m = quantize_fp8_(Block().to(DEV), skip=()).to(dtype)
    x = torch.randn(2, 5, 48, device=DEV, dtype=dtype)
    want = m(x)
    report = kernopt.explain(m, x)
    _no_pass_errors(report)
    rw = _fp8_rewrites(report, "kernopt.fp8_linear")
    assert len(rw) == 3, report.table()
    assert all("quant_rows(x)" in r.matched for r in rw)
    torch._dynamo.reset()
    got = torch.compile(m, backend="kernopt")(x)
    assert got.dtype == dtype and got.shape == want.shape
    # three quantized layers in a row: a last-bit difference in one layer's output (fp32 summation order,
    # Hopper's fp8 accumulation) can move an activation of the next across an e4m3 rounding boundary, one
    # e4m3 step (2^-4 relative) of one input element; so the chain is compared at a few percent
    _close(got, want, rel=3e-2)


class DequantLinear(nn.Module):
    """Written independently of kernopt.fp8: both operands stored in e4m3, dequantized, then F.linear."""

    def __init__(self, n=40, k=64):
        super().__init__()
        w8, sw = quantize_weight_fp8(torch.randn(n, k))
        self.register_buffer("w8", w8)
        self.register_buffer("sw", sw)
        self.register_buffer("b", torch.randn(n))

    def forward(self, x8, sx):
        return F.linear(x8.to(torch.float32) * sx, self.w8.to(torch.float32) * self.sw[:, None], self.b)


class ScaledAfter(nn.Module):
    """Codes multiplied first, scales after (column scale first, .T, torch.matmul), bias, cast."""

    def __init__(self, n=40, k=64):
        super().__init__()
        w8, sw = quantize_weight_fp8(torch.randn(n, k))
        self.register_buffer("w8", w8)
        self.register_buffer("sw", sw)

    def forward(self, x8, sx, bias):
        y = torch.matmul(x8.float(), self.w8.float().T) * self.sw * sx
        return (y + bias).to(torch.float16)


def _act(shape):
    x = torch.randn(*shape, device=DEV) * 3
    return quantize_rows_fp8_ref(x)


def test_dequant_then_linear_becomes_scaled_mm():
    m = DequantLinear().to(DEV)
    x8, sx = _act((7, 64))
    want = m(x8, sx)
    report = kernopt.explain(m, x8, sx)
    _no_pass_errors(report)
    assert len(_fp8_rewrites(report, "kernopt.fp8_scaled_mm")) == 1, report.table()
    torch._dynamo.reset()
    _close(torch.compile(m, backend="kernopt")(x8, sx), want)


def test_scaled_after_matmul_3d_becomes_scaled_mm():
    m = ScaledAfter().to(DEV)
    x8, sx = _act((2, 3, 64))
    bias = torch.randn(40, device=DEV)
    want = m(x8, sx, bias)
    report = kernopt.explain(m, x8, sx, bias)
    _no_pass_errors(report)
    rw = _fp8_rewrites(report, "kernopt.fp8_scaled_mm")
    assert len(rw) == 1 and "M=6" in rw[0].matched, report.table()
    torch._dynamo.reset()
    got = torch.compile(m, backend="kernopt")(x8, sx, bias)
    assert got.dtype == torch.float16 and got.shape == (2, 3, 40)
    _close(got, want, rel=4e-3)


def test_scaled_mm_call_becomes_kernopt_op():
    w8, sw = quantize_weight_fp8(torch.randn(48, 64, device=DEV))
    bias = torch.randn(48, device=DEV, dtype=torch.bfloat16)

    def f(x8, sx):
        return torch._scaled_mm(x8, w8.T, scale_a=sx, scale_b=sw[None, :], bias=bias, out_dtype=torch.bfloat16)

    x8, sx = _act((16, 64))
    report = kernopt.explain(f, x8, sx)
    _no_pass_errors(report)
    assert len(_fp8_rewrites(report, "kernopt.fp8_scaled_mm")) == 1, report.table()
    torch._dynamo.reset()
    got = torch.compile(f, backend="kernopt")(x8, sx)
    want = fp8_scaled_mm_ref(x8, w8.T, sx, sw[None, :], bias, torch.bfloat16)
    _close(got, want, rel=1e-2)


def test_weight_only_dequant_is_left_alone_with_reason():
    w8, sw = quantize_weight_fp8(torch.randn(40, 64, device=DEV))

    def f(x):
        return F.linear(x, w8.to(x.dtype) * sw[:, None])

    x = torch.randn(5, 64, device=DEV)
    report = kernopt.explain(f, x, options={"passes": ["fp8"]})
    assert not _fp8_rewrites(report)
    reasons = [fb.reason for fb in report.fallbacks if fb.pass_name == "fp8"]
    assert any("weight-only" in r for r in reasons), report.table()
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, backend="kernopt", options={"passes": ["fp8"]})(x), f(x))


def test_refusals_carry_reasons():
    w8, sw = quantize_weight_fp8(torch.randn(32, 64, device=DEV))
    per_input = torch.rand(1, 64, device=DEV)

    def per_input_channel(x8, sx):  # a scale along K cannot move past the matmul
        return F.linear(x8.float() * sx, w8.float() * per_input)

    x8, sx = _act((4, 64))
    report = kernopt.explain(per_input_channel, x8, sx, options={"passes": ["fp8"]})
    assert not _fp8_rewrites(report)
    assert any("weight scale" in fb.reason for fb in report.fallbacks), report.table()
    torch._dynamo.reset()

    def e5m2(a, b):
        return torch._scaled_mm(a, b.t(), scale_a=torch.ones((), device=DEV), scale_b=torch.ones((), device=DEV),
                                out_dtype=torch.float32)

    a = torch.randn(16, 32, device=DEV).to(torch.float8_e5m2)
    b = torch.randn(16, 32, device=DEV).to(torch.float8_e5m2)
    try:
        report = kernopt.explain(e5m2, a, b, options={"passes": ["fp8"]})
    except Exception as e:  # no e5m2 _scaled_mm on this build: the pass never saw it
        pytest.skip(f"torch._scaled_mm e5m2 unavailable here: {type(e).__name__}")
    assert not _fp8_rewrites(report)
    assert any("float8_e4m3fn" in fb.reason for fb in report.fallbacks), report.table()


# --------------------------------------------------------------------------------------------------
# RMSNorm feeding fp8 linears -> kernopt.rmsnorm_quant_fp8 + kernopt.fp8_linear_prequant
# --------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm, verbatim."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.5 * torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class NormQKV(nn.Module):
    """input_layernorm -> q/k/v as in a Llama block (plus the residual stream around it)."""

    def __init__(self, d=48, residual_use=False, leak_variance=False):
        super().__init__()
        self.norm = RMSNorm(d)
        self.q, self.k, self.v = nn.Linear(d, 32, bias=False), nn.Linear(d, 16, bias=False), nn.Linear(d, 16)
        self.residual_use, self.leak_variance = residual_use, leak_variance

    def forward(self, x):
        if self.leak_variance:  # the norm written inline, its variance used again below
            hs = x.to(torch.float32)
            variance = hs.pow(2).mean(-1, keepdim=True)
            h = self.norm.weight * (hs * torch.rsqrt(variance + 1e-6)).to(x.dtype)
        else:
            h = self.norm(x)
        out = torch.cat([self.q(h) + torch.cat([self.k(h), self.v(h)], dim=-1), x], dim=-1)
        if self.residual_use:  # the norm's output is needed unquantized too
            out = out + torch.cat([h, h], dim=-1)[..., :80]
        if self.leak_variance:
            out = out + variance
        return out


def exact_rows(shape, dtype):
    """Rows of +-8 and (+-4, +-4, +-4, +-4, +-16) groups, times 2^j: the norm is exact in any summation order and
    any rsqrt, so fused and unfused must agree bit for bit on every path (see tests/kernels/test_rmsnorm_quant.py)."""
    *lead, k = shape
    rows = []
    for i in range(int(torch.tensor(lead).prod())):
        vals = []
        while len(vals) < k:
            vals += [8.0] if k - len(vals) < 5 or torch.rand(()) < 0.5 else [4.0, 4.0, 4.0, 4.0, 16.0]
        row = torch.tensor(vals)[torch.randperm(k)] * torch.where(torch.rand(k) < 0.5, -1.0, 1.0) * 2.0 ** (i % 3)
        rows.append(row)
    return torch.stack(rows).reshape(shape).to(device=DEV, dtype=dtype)


def _compile_run(m, x, fuse, monkeypatch):
    from kernopt.passes.fp8 import Fp8Pass

    monkeypatch.setattr(Fp8Pass, "fuse_rmsnorm", fuse)
    torch._dynamo.reset()
    return torch.compile(m, backend="kernopt", options={"inner": "eager"})(x)


@pytest.mark.parametrize("cpu_path", ["reference", "interpreter"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rmsnorm_feeding_fp8_linears_fuses(dtype, cpu_path, monkeypatch):
    if cpu_path == "reference" or DEV == "cuda":
        monkeypatch.setenv("KERNOPT_CPU", "reference")
    m = quantize_fp8_(NormQKV(), skip=()).to(DEV).to(dtype)
    x = exact_rows((2, 5, 48), dtype)
    report = kernopt.explain(m, x, options={"inner": "eager"})
    _no_pass_errors(report)
    fused = _fp8_rewrites(report, "kernopt.rmsnorm_quant_fp8")
    assert len(fused) == 1 and "3x fp8_linear M=10 K=48" in fused[0].matched, report.table()
    assert len(_fp8_rewrites(report, "kernopt.fp8_linear_prequant")) == 3, report.table()
    assert not _fp8_rewrites(report, "kernopt.fp8_linear"), report.table()
    # exact rows: the fused norm + quantization equals norm-then-quantize bit for bit, so fused == unfused
    # (same GEMM on the same codes) on the interpreter and the reference path alike, and == eager on the latter
    got = _compile_run(m, x, True, monkeypatch)
    unfused = _compile_run(m, x, False, monkeypatch)
    assert not torch.isnan(got).any()
    assert torch.equal(got, unfused)
    if cpu_path == "reference":
        assert torch.equal(got, m(x))
    # random rows: equal on the reference path (the same ops), within a quantization step elsewhere
    xr = torch.randn(2, 5, 48, device=DEV).to(dtype)
    got, unfused = _compile_run(m, xr, True, monkeypatch), _compile_run(m, xr, False, monkeypatch)
    if cpu_path == "reference":
        assert torch.equal(got, unfused) and torch.equal(got, m(xr))
    _close(got, unfused, rel=3e-2)


@pytest.mark.parametrize("variant,reason", [("residual_use", "also feeds"), ("leak_variance", "intermediate")])
def test_rmsnorm_with_other_users_is_left_alone(variant, reason, monkeypatch):
    monkeypatch.setenv("KERNOPT_CPU", "reference")
    m = quantize_fp8_(NormQKV(**{variant: True}), skip=()).to(DEV)
    x = torch.randn(2, 5, 48, device=DEV)
    report = kernopt.explain(m, x, options={"inner": "eager"})
    _no_pass_errors(report)
    assert len(_fp8_rewrites(report, "kernopt.fp8_linear")) == 3, report.table()  # the linears still go
    assert not _fp8_rewrites(report, "kernopt.rmsnorm_quant_fp8"), report.table()
    assert any(reason in fb.reason for fb in report.fallbacks if fb.pass_name == "fp8"), report.table()
    torch.testing.assert_close(_compile_run(m, x, True, monkeypatch), m(x))


def test_tiny_llama_fuses_both_norms_per_layer(monkeypatch):
    transformers = pytest.importorskip("transformers")
    # a whole model: on CPU its ops run their references (the kernels run in the interpreter in the tests
    # above); on the GPU the Triton kernels run
    monkeypatch.setenv("KERNOPT_CPU", "reference")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = quantize_fp8_(transformers.LlamaForCausalLM(cfg).eval()).to(DEV)
    ids = torch.randint(0, 97, (2, 9), device=DEV)
    report = kernopt.explain(model, ids, options={"inner": "eager"})
    _no_pass_errors(report)
    fused = _fp8_rewrites(report, "kernopt.rmsnorm_quant_fp8")
    # per layer: input_layernorm -> q/k/v and post_attention_layernorm -> gate/up; the final norm feeds lm_head
    assert sorted(r.matched.split(" M=")[0] for r in fused) == \
        ["rmsnorm -> quant_rows -> 2x fp8_linear"] * 2 + ["rmsnorm -> quant_rows -> 3x fp8_linear"] * 2, \
        report.table()
    assert len(_fp8_rewrites(report, "kernopt.fp8_linear_prequant")) == 10  # o_proj, down_proj stay fp8_linear
    assert len(_fp8_rewrites(report, "kernopt.fp8_linear")) == 4

    def logits(fuse):
        from kernopt.passes.fp8 import Fp8Pass

        monkeypatch.setattr(Fp8Pass, "fuse_rmsnorm", fuse)
        torch._dynamo.reset()
        with torch.no_grad():
            return torch.compile(model, backend="kernopt", options={"inner": "eager"})(ids).logits

    got, unfused = logits(True), logits(False)
    assert not torch.isnan(got).any()
    if DEV == "cpu":  # reference path: the fused ops are the unfused graph's very ops
        assert torch.equal(got, unfused)
    # on the GPU a last-bit difference in the norm (summation order) can move a code by one e4m3 step, which
    # two layers carry to the logits at well under a percent of their scale
    _close(got, unfused, rel=2e-2)


# ------------------------------------------------------------------------------------------------
# The prompt lane: graphs without CUDA graphs, static rows >= PROMPT_MIN_ROWS -> torch._scaled_mm
# ------------------------------------------------------------------------------------------------
LANE = "torch._scaled_mm (prompt lane)"


def _spy_compile(m, x, options=None):
    """Compile m with the kernopt backend (rest of the graph eager); the output and the rewritten graph's nodes."""
    graphs = []

    def spy(gm, example_inputs):
        from kernopt.backend import kernopt_backend

        out = kernopt_backend(gm, example_inputs, options={"inner": "eager", **(options or {})})
        graphs.append(gm)
        return out

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(m, backend=spy)(x)
    return got, [n for g in graphs for n in g.graph.nodes]


def test_prompt_lane_takes_prompt_rows_and_shares_the_quantization():
    from kernopt.passes.fp8 import PROMPT_MIN_ROWS, prompt_linear

    torch.manual_seed(0)
    m = quantize_fp8_(NormQKV(d=64), skip=()).to(DEV).to(torch.bfloat16)  # v has a bias
    x = torch.randn(2, 100, 64, device=DEV).to(torch.bfloat16)
    assert 200 >= PROMPT_MIN_ROWS
    report = kernopt.explain(m, x, options={"inner": "eager"})
    _no_pass_errors(report)
    lane = _fp8_rewrites(report, LANE)
    assert len(lane) == 3 and all("M=200" in r.matched for r in lane), report.table()
    assert sum("shared" in r.config for r in lane) == 2, report.table()  # q quantizes; k and v reuse its codes
    assert not _fp8_rewrites(report, "kernopt.fp8_linear") and not _fp8_rewrites(report, "kernopt.rmsnorm_quant_fp8")
    with torch.no_grad():
        want = m(x)
    got, nodes = _spy_compile(m, x)
    calls = [n for n in nodes if n.op == "call_function" and n.target is prompt_linear]
    assert len(calls) == 3 and len({n.args[0] for n in calls}) == 1 and len({n.args[1] for n in calls}) == 1
    assert sum(1 for n in nodes if n.target in ("amax", torch.amax)) == 1
    assert not [n for n in nodes if "kernopt" in str(n.target)]
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    _close(got, want, rel=1e-2)  # each linear's output within a bf16 rounding of the reference's


@pytest.mark.parametrize("case,reason", [
    ("few_rows", None), ("fp16", "bf16 only"), ("cuda_graphs", None), ("switch_off", None),
    ("odd_n", "multiples of 16")])
def test_prompt_lane_leaves_the_kernel_where_it_does_not_apply(case, reason, monkeypatch):
    d, rows, dtype, options = 64, 100, torch.bfloat16, {"inner": "eager"}
    if case == "few_rows":
        rows = 5
    elif case == "fp16":
        dtype = torch.float16
    elif case == "cuda_graphs":
        options["mode"] = "reduce-overhead"
    elif case == "switch_off":
        monkeypatch.setenv("KERNOPT_FP8_PROMPT", "kernel")
    m = NormQKV(d=d)
    if case == "odd_n":
        m.q = nn.Linear(d, 40, bias=False)
        m.k = nn.Linear(d, 20, bias=False)
        m.v = nn.Linear(d, 20)
    m = quantize_fp8_(m, skip=()).to(DEV).to(dtype)
    x = torch.randn(2, rows, d, device=DEV).to(dtype)
    report = kernopt.explain(m, x, options=options)
    _no_pass_errors(report)
    assert not _fp8_rewrites(report, LANE), report.table()
    assert len(_fp8_rewrites(report, "kernopt.fp8_linear_prequant")) + \
        len(_fp8_rewrites(report, "kernopt.fp8_linear")) == 3, report.table()
    lane_notes = [f for f in report.fallbacks if f.pass_name == "fp8_prompt"]
    if reason is None:
        assert not lane_notes, report.table()
    else:
        assert len(lane_notes) == 3 and all(reason in f.reason for f in lane_notes), report.table()


def test_prompt_lane_switch_rejects_unknown_values(monkeypatch):
    from kernopt.passes.fp8 import prompt_mode

    monkeypatch.setenv("KERNOPT_FP8_PROMPT", "cublas")
    with pytest.raises(ValueError, match="KERNOPT_FP8_PROMPT"):
        prompt_mode()


def test_tiny_llama_prompt_takes_the_lane_and_matches_eager():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = quantize_fp8_(transformers.LlamaForCausalLM(cfg).eval()).to(DEV).to(torch.bfloat16)
    ids = torch.randint(0, 97, (1, 200), device=DEV)
    report = kernopt.explain(model, ids, options={"inner": "eager"})
    _no_pass_errors(report)
    lane = _fp8_rewrites(report, LANE)
    # per layer q/k/v/o/gate/up/down; k, v reuse q's codes and up reuses gate's; lm_head stays bf16
    assert len(lane) == 14 and sum("shared" in r.config for r in lane) == 6, report.table()
    assert not _fp8_rewrites(report, "kernopt.fp8_linear") and not _fp8_rewrites(report, "kernopt.fp8_linear_prequant")
    with torch.no_grad():
        want = model(ids).logits
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="kernopt", options={"inner": "eager"})(ids).logits
    assert not torch.isnan(got).any()
    # a last-bit difference in one layer (the GEMM's summation order) can move a code of the next by one e4m3 step
    _close(got, want, rel=2e-2)
