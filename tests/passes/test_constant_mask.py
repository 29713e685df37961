"""passes/constant_mask.py: attention masks computed from constants, folded into flash_attention's causal flag."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernopt
from kernopt.passes.constant_mask import classify
from kernopt.tolerance import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def _folds(report):
    return [r for r in report.rewrites if r.pass_name == "attention" and "constant mask" in r.matched]


def _kept(report):
    return [f for f in report.fallbacks if f.pass_name == "attention" and "constant mask" in f.matched]


def _qkv(B, Hq, Hkv, Sq, Skv, D, dtype):
    q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=DEV).transpose(1, 2)
    k = torch.randn(B, Skv, Hkv, D, dtype=dtype, device=DEV).transpose(1, 2)
    v = torch.randn(B, Skv, Hkv, D, dtype=dtype, device=DEV).transpose(1, 2)
    return q, k, v


def _check(fn, args, want_kind, dtype):
    torch._dynamo.reset()
    report = kernopt.explain(fn, *args)
    folds = _folds(report)
    if want_kind is None:
        assert not folds, report.table()
        assert _kept(report), report.table()
    else:
        assert folds and all(f"({want_kind})" in r.matched for r in folds), report.table()
        assert all(("causal=True" in r.config) == (want_kind == "causal")
                   for r in folds), report.table()
    torch._dynamo.reset()
    want = fn(*(a.double() if a.is_floating_point() else a for a in args))
    with torch.no_grad():
        got = torch.compile(fn, backend="kernopt")(*args)
    assert_close(got, want, dtype, scale=4.0)
    return report


# The HF form (transformers.masking_utils.sdpa_mask under compile): aranges compared and expanded.
def hf_causal(q, k, v):
    sq, skv = q.shape[2], k.shape[2]
    kv_idx = (torch.arange(skv, device=q.device) + 0)[None, None, None, :]
    q_idx = (torch.arange(sq, device=q.device) + (skv - sq))[None, None, :, None]
    mask = (kv_idx <= q_idx).expand(q.shape[0], -1, sq, skv)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def tril_causal(q, k, v):
    sq, skv = q.shape[2], k.shape[2]
    mask = torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril(skv - sq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def additive_causal(q, k, v):
    sq, skv = q.shape[2], k.shape[2]
    mask = torch.full((sq, skv), float("-inf"), dtype=q.dtype, device=q.device).triu(skv - sq + 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def all_attend(q, k, v):
    mask = torch.ones(q.shape[0], 1, q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def hand_written_causal(q, k, v):  # masked_fill with a constant causal mask, in softmax attention
    sq, skv = q.shape[2], k.shape[2]
    keep = torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril(skv - sq)
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
    w = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    w = w.masked_fill(~keep, float("-inf"))
    return F.softmax(w, dim=-1) @ v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn,kind", [(hf_causal, "causal"), (tril_causal, "causal"), (additive_causal, "causal"),
                                     (all_attend, "full"), (hand_written_causal, "causal")])
@pytest.mark.parametrize("sq,skv", [(19, 19), (13, 37), (1 + 64, 64 + 65)])
def test_constant_masks_fold_and_match(fn, kind, sq, skv, dtype):
    q, k, v = _qkv(2, 4, 2, sq, skv, 16, dtype)
    _check(fn, (q, k, v), kind, dtype)


# Constants that are not the kernel's causal rule: each keeps its mask (and the answer stays right).
def top_left_causal(q, k, v):  # SDPA's is_causal alignment: differs from bottom-right when Skv > Sq
    sq, skv = q.shape[2], k.shape[2]
    mask = torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def causal_off_by_one(q, k, v):  # the diagonal itself hidden from all but the first row
    sq, skv = q.shape[2], k.shape[2]
    mask = torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril(skv - sq - 1)
    mask[:, 0] = True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def sliding_window(q, k, v):
    sq, skv = q.shape[2], k.shape[2]
    mask = torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril(skv - sq).triu(skv - sq - 4)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def finite_additive(q, k, v):  # HF eager's finfo.min: not provably the kernel's -inf on every input
    sq, skv = q.shape[2], k.shape[2]
    mask = torch.full((sq, skv), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device).triu(skv - sq + 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("fn,reason", [(top_left_causal, "neither"), (causal_off_by_one, "neither"),
                                       (sliding_window, "neither"), (finite_additive, "other than 0 and -inf")])
def test_other_constants_keep_their_mask(fn, reason):
    q, k, v = _qkv(2, 4, 2, 13, 29, 16, torch.float32)
    report = _check(fn, (q, k, v), None, torch.float32)
    assert all(reason in f.reason for f in _kept(report)), report.table()


def test_more_query_rows_than_keys_keep_the_mask():
    """Bottom-right causal with Sq > Skv hides every key from the first rows: a mask's answer there is not the
    causal flag's to give, so the fold leaves it."""
    q, k, v = _qkv(1, 2, 2, 21, 9, 16, torch.float32)
    torch._dynamo.reset()
    report = kernopt.explain(tril_causal, q, k, v)
    assert not _folds(report) and _kept(report), report.table()


def test_masks_from_inputs_and_buffers_are_kept():
    q, k, v = _qkv(2, 4, 4, 11, 11, 16, torch.float32)
    causal = torch.ones(11, 11, dtype=torch.bool, device=DEV).tril()

    def from_input(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    torch._dynamo.reset()
    report = kernopt.explain(from_input, q, k, v, causal)
    assert not _folds(report) and any("graph input" in f.reason for f in _kept(report)), report.table()

    class Buffered(nn.Module):  # GPT-2's registered causal buffer: its contents may change between calls
        def __init__(self):
            super().__init__()
            self.register_buffer("bias", torch.ones(32, 32, dtype=torch.bool, device=DEV).tril())

        def forward(self, q, k, v):
            s = q.shape[2]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias[:s, :s])

    torch._dynamo.reset()
    report = kernopt.explain(Buffered(), q, k, v)
    assert not _folds(report) and _kept(report), report.table()


def test_impure_or_random_ancestry_is_kept():
    q, k, v = _qkv(1, 2, 2, 9, 9, 16, torch.float32)

    def random_mask(q, k, v):
        mask = torch.rand(9, 9, device=q.device) > -1.0  # all True, but not provably so
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch._dynamo.reset()
    report = kernopt.explain(random_mask, q, k, v)
    assert not _folds(report) and any("rand" in f.reason for f in _kept(report)), report.table()


def test_switch_off(monkeypatch):
    monkeypatch.setenv("KERNOPT_MASK_FOLD", "0")
    q, k, v = _qkv(1, 2, 2, 9, 9, 16, torch.float32)
    torch._dynamo.reset()
    report = kernopt.explain(tril_causal, q, k, v)
    assert not _folds(report) and not _kept(report), report.table()


def test_shared_mask_folded_once_and_its_subgraph_erased():
    """Every layer of an HF model reads one mask: all calls fold, and the mask's nodes leave the graph."""
    q, k, v = _qkv(1, 2, 2, 12, 12, 16, torch.float32)

    def two_layers(q, k, v):
        kv_idx = torch.arange(12, device=q.device)[None, None, None, :]
        q_idx = torch.arange(12, device=q.device)[None, None, :, None]
        mask = (kv_idx <= q_idx).expand(1, -1, 12, 12)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(h, k, v, attn_mask=mask)

    graphs = []

    def spy(gm, example_inputs):
        from kernopt.backend import kernopt_backend

        out = kernopt_backend(gm, example_inputs, options={"inner": "eager"})
        graphs.append(gm)
        return out

    torch._dynamo.reset()
    got = torch.compile(two_layers, backend=spy)(q, k, v)
    assert_close(got, two_layers(q.double(), k.double(), v.double()), torch.float32, scale=4.0)
    nodes = [n for g in graphs for n in g.graph.nodes]
    calls = [n for n in nodes if "flash_attention" in str(n.target)]
    assert len(calls) == 2 and all(n.args[3] is None and n.args[4] is True for n in calls)
    assert not [n for n in nodes if n.op == "call_function" and n.target in (torch.arange,)]


def test_classify():
    s = 6
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    assert classify(causal, s, s) == "causal"
    assert classify(causal[None, None].expand(3, 4, s, s), s, s) == "causal"
    assert classify(torch.ones(1, 1, 1, 1, dtype=torch.bool), s, s) == "full"
    assert classify(torch.ones(s, 9, dtype=torch.bool).tril(3), s, 9) == "causal"  # bottom-right, Skv > Sq
    assert classify(torch.ones(s, 9, dtype=torch.bool).tril(), s, 9) is None  # top-left
    per_batch = torch.stack([causal, causal.clone()])
    per_batch[1, 5, 2] = False
    assert classify(per_batch[:, None], s, s) is None  # one batch differs
    assert classify(torch.ones(9, s, dtype=torch.bool).tril(s - 9), 9, s) is None  # Sq > Skv
    assert classify(torch.zeros(s, s, dtype=torch.bool), s, s) is None


def test_a_kept_mask_is_reported_once():
    """Every layer reads the model's one mask: explain() says once why it stays, not once per layer."""
    q, k, v = _qkv(1, 2, 2, 12, 12, 16, torch.float32)

    def two_layers(q, k, v, m):
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return F.scaled_dot_product_attention(h, k, v, attn_mask=m)

    torch._dynamo.reset()
    report = kernopt.explain(two_layers, q, k, v, torch.ones(12, 12, dtype=torch.bool, device=DEV).tril())
    kept = _kept(report)
    assert len(kept) == 1 and "2 attention call(s)" in kept[0].matched, report.table()
