"""The int4 pass: dequant -> matmul subgraphs, in kernopt's own form and in independently written
GPTQ-style and uint8-style idioms, rewritten to kernopt.int4_linear; refusals carry reasons."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernopt
from kernopt.int4 import Int4Linear, pack_int4
from kernopt.tolerance import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.float16


def _rewrites(report):
    return [r for r in report.rewrites if r.pass_name == "int4"]


def _refusals(report):
    return [f for f in report.fallbacks if f.pass_name == "int4"]


def _no_pass_errors(report):
    assert not [f for f in report.fallbacks if "raised" in f.reason], report.table()


def _codes(N, K):
    return torch.randint(0, 16, (N, K), dtype=torch.int32)


class GPTQStyle(nn.Module):
    """AutoGPTQ-like: int32 words packed along K ([K/8, N]), qzeros packed along N and stored minus one,
    scales [G, N]; shifts in a buffer; scale on the left; x @ W with W [K, N]."""

    def __init__(self, codes, zeros, scales, g):
        super().__init__()
        N, K = codes.shape
        self.g = g
        self.register_buffer("qweight", pack_int4(codes).t().contiguous())  # [K/8, N]: same words, transposed
        zm1 = (zeros.clamp(min=1) - 1).t().contiguous()  # [G, N]; v1 stores zero - 1 (zeros >= 1 here)
        self.register_buffer("qzeros", pack_int4(zm1))  # [G, N/8], packed along N
        self.register_buffer("scales", scales.t().contiguous())  # [G, N]
        self.register_buffer("wf", torch.arange(0, 32, 4, dtype=torch.int32))

    def forward(self, x):
        zeros = torch.bitwise_right_shift(torch.unsqueeze(self.qzeros, 2).expand(-1, -1, 8),
                                          self.wf.unsqueeze(0).unsqueeze(0)).to(torch.int16)
        zeros = torch.bitwise_and(zeros, 15)
        zeros = zeros + 1
        zeros = zeros.reshape(self.scales.shape)
        weight = torch.bitwise_right_shift(torch.unsqueeze(self.qweight, 1).expand(-1, 8, -1),
                                           self.wf.unsqueeze(-1).unsqueeze(0)).to(torch.int16)
        weight = torch.bitwise_and(weight, 15)
        weight = weight.reshape(-1, self.g, weight.shape[2])  # [G, g, N]
        w = self.scales.unsqueeze(1) * (weight - zeros.unsqueeze(1))
        w = w.reshape(-1, w.shape[2])  # [K, N]
        return torch.matmul(x, w)


class ByteStyle(nn.Module):
    """uint8 bytes [N, K/2], low nibble = even k; (w >> 4) & 0xF / w & 0xF with unsqueeze / cat / view;
    q * s - z * s order; F.linear with bias. `high_first` swaps the nibble order (not our layout)."""

    def __init__(self, codes, zeros, scales, g, bias, high_first=False):
        super().__init__()
        N, K = codes.shape
        self.g, self.high_first = g, high_first
        lo, hi = codes[:, 0::2], codes[:, 1::2]
        if high_first:
            lo, hi = hi, lo
        self.register_buffer("qweight", (lo | (hi << 4)).to(torch.uint8))
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros.to(scales.dtype))
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        lo = self.qweight & 0xF
        hi = (self.qweight >> 4) & 0xF
        first, second = (hi, lo) if self.high_first else (lo, hi)
        q = torch.cat([first.unsqueeze(-1), second.unsqueeze(-1)], dim=-1)  # [N, K/2, 2]
        N = q.shape[0]
        q = q.view(N, -1, self.g).to(self.scales.dtype)  # [N, G, g]
        s = self.scales[..., None]
        w = q * s - self.zeros[..., None] * s
        return F.linear(x, w.view(N, -1), self.bias)


class AWQStyle(nn.Module):
    """Words packed along N ([K, N/8]): not viewable as kernopt's layout -> refused with a reason."""

    def __init__(self, codes, scales, g):
        super().__init__()
        self.g = g
        self.register_buffer("qweight", pack_int4(codes.t().contiguous()))  # [K, N/8]
        self.register_buffer("scales", scales.t().contiguous())  # [G, N]

    def forward(self, x):
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=x.device)
        q = (self.qweight.unsqueeze(-1) >> shifts) & 15  # [K, N/8, 8]
        q = q.reshape(q.shape[0], -1)  # [K, N]
        K, N = q.shape
        w = (q.reshape(-1, self.g, N).to(self.scales.dtype) - 8) * self.scales.unsqueeze(1)
        return x @ w.reshape(K, N)


def _case(N=40, K=128, g=32):
    codes = _codes(N, K)
    zeros = torch.randint(1, 16, (N, K // g), dtype=torch.int32)
    scales = (torch.rand(N, K // g) * 0.05 + 0.01).to(DT)
    return codes, zeros, scales


def _check(model, x, expect_rewrite=True):
    model = model.to(DEV)
    x = x.to(DEV)
    with torch.no_grad():
        want = model(x)
    torch._dynamo.reset()
    report = kernopt.explain(model, x, options={"inner": "eager"})
    _no_pass_errors(report)
    if expect_rewrite:
        assert _rewrites(report), report.table()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="kernopt")
        with torch.no_grad():
            got = compiled(x)
        assert_close(got, want.double(), DT, scale=2.0)
    return report


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_int4_pass_own_module(symmetric, g):
    lin = nn.Linear(128, 24, bias=True).to(DT)
    m = Int4Linear.from_linear(lin, g, symmetric=symmetric)
    report = _check(m, torch.randn(2, 3, 128, dtype=DT))
    r = _rewrites(report)[0]
    assert r.kernel == "kernopt.int4_linear" and f"g{g}" in r.matched


def test_int4_pass_gptq_style_matmul_with_transposed_words():
    codes, zeros, scales = _case(N=40, K=128, g=32)
    report = _check(GPTQStyle(codes, zeros, scales, 32), torch.randn(5, 128, dtype=DT))
    r = _rewrites(report)[0]
    assert "qweight.t()" in r.matched and "scales.t()" in r.matched, r.matched


def test_int4_pass_byte_style_views_as_words():
    codes, zeros, scales = _case(N=24, K=192, g=64)
    report = _check(ByteStyle(codes, zeros, scales, 64, torch.randn(24, dtype=DT)), torch.randn(3, 192, dtype=DT))
    assert "view(int32)" in _rewrites(report)[0].matched


def test_int4_pass_refuses_high_nibble_first_bytes():
    codes, zeros, scales = _case(N=24, K=128, g=32)
    m = ByteStyle(codes, zeros, scales, 32, torch.randn(24, dtype=DT), high_first=True)
    report = _check(m, torch.randn(3, 128, dtype=DT), expect_rewrite=False)
    assert not _rewrites(report)
    reasons = [f.reason for f in _refusals(report)]
    assert any("not (nibble - zero) * scale in any layout" in r for r in reasons), reasons


def test_int4_pass_refuses_awq_packing_along_n():
    codes, _, scales = _case(N=32, K=128, g=64)
    report = _check(AWQStyle(codes, scales, 64), torch.randn(2, 128, dtype=DT), expect_rewrite=False)
    assert not _rewrites(report)
    reasons = [f.reason for f in _refusals(report)]
    assert any("AWQ" in r for r in reasons), reasons


def test_int4_pass_refuses_group_the_kernel_cannot_take():
    codes, zeros, _ = _case(N=16, K=96, g=32)
    scales = (torch.rand(16, 4) * 0.05 + 0.01).to(DT)  # 4 groups of 24
    report = _check(ByteStyle(codes, zeros[:, :1].repeat(1, 4), scales, 24, torch.randn(16, dtype=DT)),
                    torch.randn(2, 96, dtype=DT), expect_rewrite=False)
    reasons = [f.reason for f in _refusals(report)]
    assert any("group size 24" in r for r in reasons), reasons


def test_prompt_rows_left_to_inductor_outside_cuda_graphs(monkeypatch):
    """KERNOPT_INT4_PROMPT: by default ("auto") int4 linears of a static >= 192 rows (where the table picks dequantize +
    cuBLAS) in a graph without CUDA graphs become kernopt.int4_weight (the dequantize kernel as a triton_op) under a
    plain linear, in every idiom (F.linear on [N, K], x @ W on [K, N]); fewer rows, symbolic rows, and graphs under
    mode="reduce-overhead" keep kernopt.int4_linear. "inductor" leaves the whole subgraph to Inductor from 17 rows,
    "kernel" never; a bad value is an error. The compiled results match the modules' own math."""
    from kernopt.kernels.int4_gemm import DEQUANT_CUBLAS_MIN_M
    from kernopt.passes.int4 import PROMPT_AUTO_MIN_ROWS, PROMPT_ENV

    assert PROMPT_AUTO_MIN_ROWS == DEQUANT_CUBLAS_MIN_M
    m = Int4Linear.from_linear(nn.Linear(128, 24, bias=False).to(DT), 32).to(DEV)
    prompt = torch.randn(32, 128, dtype=DT, device=DEV)
    long = torch.randn(PROMPT_AUTO_MIN_ROWS, 128, dtype=DT, device=DEV)
    decode = torch.randn(1, 128, dtype=DT, device=DEV)

    def kernels(x, module=m, **options):
        torch._dynamo.reset()
        report = kernopt.explain(module, x, options={"inner": "eager", **options})
        _no_pass_errors(report)
        return [r.kernel for r in _rewrites(report)], report

    monkeypatch.delenv(PROMPT_ENV, raising=False)
    for x, options in ((prompt, {}), (decode, {}), (long, {"mode": "reduce-overhead"}), (long[:-1].clone(), {})):
        assert kernels(x, **options)[0] == ["kernopt.int4_linear"], (x.shape, options)
    done, report = kernels(long)
    assert done == ["kernopt.int4_weight"] and not _refusals(report)
    assert f"{PROMPT_AUTO_MIN_ROWS} rows in a graph without CUDA graphs (KERNOPT_INT4_PROMPT=auto)" in \
        _rewrites(report)[0].config
    torch._dynamo.reset()  # symbolic rows (a graph compiled for any row count) keep the kernel
    torch._dynamo.mark_dynamic(long, 0)
    assert [r.kernel for r in _rewrites(kernopt.explain(m, long, options={"inner": "eager"}))] == \
        ["kernopt.int4_linear"]
    for module in (m, GPTQStyle(*_case(N=40, K=128, g=32), 32).to(DEV),
                   ByteStyle(*_case(N=24, K=128, g=64), 64, torch.randn(24, dtype=DT)).to(DEV)):
        x = torch.randn(3, PROMPT_AUTO_MIN_ROWS // 3, 128, dtype=DT, device=DEV)  # rows over two dims
        assert kernels(x, module)[0] == ["kernopt.int4_weight"], type(module).__name__
        with torch.no_grad():  # the module's math in float64: ByteStyle's fp16 q * s - z * s rounds twice
            want = copy.deepcopy(module).double()(x.double())
            for backend_options in ({"inner": "eager"}, {}):
                torch._dynamo.reset()
                got = torch.compile(module, backend="kernopt", options=backend_options)(x)
                assert_close(got, want, DT, scale=2.0)

    class Shared(nn.Module):  # one dequantized weight, two linears: one int4_weight, no confusing refusal
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            w = self.lin.dequantize(x.dtype)
            return F.linear(x, w) + F.linear(x * 2, w)

    shared, x = Shared(m), long.clone()  # (long is marked dynamic above)
    done, report = kernels(x, shared)
    assert done == ["kernopt.int4_weight"] and not _refusals(report), report.table()
    torch._dynamo.reset()
    with torch.no_grad():
        want = copy.deepcopy(shared).double()(x.double())
        assert_close(torch.compile(shared, backend="kernopt")(x), want, DT, scale=2.0)

    monkeypatch.setenv(PROMPT_ENV, "inductor")
    done, report = kernels(prompt)
    assert not done and any("32 rows in a graph without CUDA graphs (KERNOPT_INT4_PROMPT=inductor)" in f.reason
                            for f in _refusals(report))
    assert kernels(decode)[0] == kernels(prompt, mode="reduce-overhead")[0] == ["kernopt.int4_linear"]
    torch._dynamo.reset()
    with torch.no_grad():
        assert_close(torch.compile(m, backend="kernopt")(prompt), m(prompt).double(), DT, scale=2.0)
    monkeypatch.setenv(PROMPT_ENV, "kernel")
    assert kernels(long)[0] == ["kernopt.int4_linear"]
    monkeypatch.setenv(PROMPT_ENV, "always")
    with pytest.raises(Exception, match=PROMPT_ENV):
        kernels(prompt)
