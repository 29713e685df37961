"""The decode_append step of the attention pass: HF's rotary + static-cache index_copy_ + decode attention ->
`kernopt.decode_attention_append` (on unless KERNOPT_DECODE_APPEND=0), and what it leaves alone."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernopt
from kernopt import ops
from kernopt.tolerance import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.float16
B, HQ, HKV, S, D = 2, 8, 2, 24, 32

pytestmark = pytest.mark.skipif(ops.implementation(torch.empty(0, dtype=DT, device=DEV)) == "reference",
                                reason="the attention pass rewrites only where a kernel runs")


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class StaticStep(nn.Module):
    """One decode step written as transformers' Llama attention and StaticLayer.update write it."""

    def __init__(self, read_between=False):
        super().__init__()
        self.read_between = read_between

    def forward(self, q, k, v, cos, sin, keys, values, cum, mask):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        pos = torch.arange(1, device=keys.device) + cum
        cum.add_(1)
        keys.index_copy_(2, pos, k)
        values.index_copy_(2, pos, v)
        extra = keys.sum() if self.read_between else None
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return out if extra is None else (out, extra)


def _inputs(pos=9):
    torch.manual_seed(0)
    q = torch.randn(B, HQ, 1, D, dtype=DT, device=DEV)
    k = torch.randn(B, HKV, 1, D, dtype=DT, device=DEV)
    v = torch.randn(B, HKV, 1, D, dtype=DT, device=DEV)
    ang = torch.rand(1, 1, D // 2, device=DEV).repeat(1, 1, 2) * 6.0
    cos, sin = ang.cos().to(DT), ang.sin().to(DT)
    keys = torch.randn(B, HKV, S, D, dtype=DT, device=DEV)
    values = torch.randn(B, HKV, S, D, dtype=DT, device=DEV)
    cum = torch.tensor(pos, device=DEV)
    mask = (torch.arange(S, device=DEV) <= pos)[None, None, None, :].expand(B, 1, 1, S)
    return [q, k, v, cos, sin, keys, values, cum, mask]


def _clone(args):
    return [a.clone() for a in args]


def _same_state(args, want_args, pos):
    """Counter and caches as eager left them: the written row within fp16 rounding (the rotary rounds once, eager
    after each op), every other row exactly."""
    torch.testing.assert_close(args[7], want_args[7], rtol=0, atol=0)
    for got, ref in zip(args[5:7], want_args[5:7]):
        others = torch.arange(S, device=DEV) != pos
        torch.testing.assert_close(got[:, :, others], ref[:, :, others], rtol=0, atol=0)
        assert_close(got[:, :, pos], ref[:, :, pos].double(), DT)


def _appends(report):
    return [r for r in report.rewrites if r.pass_name == "decode_append"]


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_fuses_and_matches_eager(monkeypatch, inner):
    monkeypatch.setenv("KERNOPT_DECODE_APPEND", "1")
    args = _inputs()
    want_args = _clone(args)
    with torch.no_grad():
        want = StaticStep()(*want_args)
    torch._dynamo.reset()
    report = kernopt.explain(StaticStep(), *args, options={"inner": inner})
    fused = _appends(report)
    assert len(fused) == 1 and fused[0].kernel == "kernopt.decode_attention_append", report.table()
    _same_state(args, want_args, pos=9)  # explain ran the step once: caches and counter moved as eager's did
    torch._dynamo.reset()
    compiled = torch.compile(StaticStep(), backend="kernopt", options={"inner": inner})
    args = _inputs(pos=4)
    want_args = _clone(args)
    with torch.no_grad():
        want = StaticStep()(*want_args)
        got = compiled(*args)
    assert_close(got, want.double(), DT)
    _same_state(args, want_args, pos=4)


def test_on_by_default_off_with_0_and_bad_value(monkeypatch):
    monkeypatch.delenv("KERNOPT_DECODE_APPEND", raising=False)
    torch._dynamo.reset()
    report = kernopt.explain(StaticStep(), *_inputs(), options={"inner": "eager"})
    assert _appends(report), report.table()
    monkeypatch.setenv("KERNOPT_DECODE_APPEND", "0")
    torch._dynamo.reset()
    report = kernopt.explain(StaticStep(), *_inputs(), options={"inner": "eager"})
    assert not _appends(report) and any(r.kernel == "kernopt.decode_attention" for r in report.rewrites), \
        report.table()
    monkeypatch.setenv("KERNOPT_DECODE_APPEND", "yes")
    from kernopt.passes.decode_append import append_enabled

    with pytest.raises(ValueError, match="KERNOPT_DECODE_APPEND"):
        append_enabled()


def test_cache_read_between_the_writes_and_attention_is_left_alone(monkeypatch):
    monkeypatch.setenv("KERNOPT_DECODE_APPEND", "1")
    args = _inputs()
    want_args = _clone(args)
    with torch.no_grad():
        want = StaticStep(read_between=True)(*want_args)
    torch._dynamo.reset()
    report = kernopt.explain(StaticStep(read_between=True), *args, options={"inner": "eager"})
    assert not _appends(report), report.table()
    assert [f for f in report.fallbacks if f.pass_name == "decode_append" and "read between" in f.reason], \
        report.table()
    torch._dynamo.reset()
    compiled = torch.compile(StaticStep(read_between=True), backend="kernopt", options={"inner": "eager"})
    args = _inputs()
    with torch.no_grad():
        got = compiled(*args)
    assert_close(got[0], want[0].double(), DT)
    torch.testing.assert_close(got[1], want[1], rtol=1e-3, atol=1e-2)
