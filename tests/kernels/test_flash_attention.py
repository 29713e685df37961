"""FlashAttention prefill kernel vs the float64 reference (interpreter on CPU, Triton on CUDA)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kernopt.kernels.flash_attention import (
    candidate_configs, flash_attention, flash_attention_ref, select_config, supports)
from kernopt.tolerance import assert_close, mismatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small tiles so that odd lengths span several blocks and hit every masked / unmasked loop.
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
# The same rows as two 16-row halves sharing each K/V tile (the "ping-pong" path).
SPLIT = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "SPLIT": True}


def make_qkv(B, Hq, Hkv, Sq, Skv, D, dtype, q_transposed=True):
    if q_transposed:  # HF hands q as a transpose of [B, S, H, D]
        q = torch.randn(B, Sq, Hq, D, dtype=dtype, device=DEVICE).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, Sq, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, Hkv, Skv, D, dtype=dtype, device=DEVICE)
    v = torch.randn(B, Skv, Hkv, D, dtype=dtype, device=DEVICE).transpose(1, 2)
    return q, k, v


def run(q, k, v, mask=None, causal=False, sm_scale=None, config=SMALL):
    out = torch.full((*q.shape[:-1], v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    got = flash_attention(q, k, v, mask=mask, causal=causal, sm_scale=sm_scale, config=config, out=out)
    assert got.data_ptr() == out.data_ptr()
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    ref = flash_attention_ref(q.double(), k.double(), v.double(), m64, causal, sm_scale)
    return out, ref


def padding_mask(B, Skv, dtype=torch.bool):
    """HF-style [B, 1, 1, Skv] key-padding mask, left padding of a random length per sequence."""
    keep = torch.ones(B, Skv, dtype=torch.bool)
    for b in range(B):
        keep[b, : int(torch.randint(0, max(1, Skv // 2), ()))] = False
    keep = keep[:, None, None, :].to(DEVICE)
    if dtype == torch.bool:
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=DEVICE).masked_fill(~keep, torch.finfo(dtype).min)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Skv", [(17, 17), (33, 50), (50, 33), (1, 40), (129, 129)])
def test_matches_reference(dtype, causal, Sq, Skv):
    q, k, v = make_qkv(2, 4, 2, Sq, Skv, 32, dtype)
    out, ref = run(q, k, v, causal=causal)
    assert_close(out, ref, dtype)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), ratio=st.sampled_from([1, 2, 4]),
       Sq=st.sampled_from([1, 3, 17, 40]), Skv=st.sampled_from([1, 17, 33, 70]),
       D=st.sampled_from([16, 32, 24]), causal=st.booleans(),
       mask_kind=st.sampled_from(["none", "bool_pad", "add_pad", "bool_full", "add_heads"]),
       dtype=st.sampled_from([torch.float16, torch.float32]), split=st.booleans(), seed=st.integers(0, 2**16))
def test_hypothesis(B, Hkv, ratio, Sq, Skv, D, causal, mask_kind, dtype, split, seed):
    torch.manual_seed(seed)
    Hq = Hkv * ratio
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Skv, D, dtype, q_transposed=bool(seed % 2))
    mask = None
    if mask_kind == "bool_pad":
        mask = padding_mask(B, Skv)
    elif mask_kind == "add_pad":
        mask = padding_mask(B, Skv, dtype)
    elif mask_kind == "bool_full":  # [B, 1, Sq, Skv], a broadcast over heads
        mask = torch.rand(B, 1, Sq, Skv, device=DEVICE) > 0.3
    elif mask_kind == "add_heads":  # [Hq, Sq, Skv] additive bias, broadcast over batch
        mask = torch.randn(Hq, Sq, Skv, dtype=dtype, device=DEVICE)
    out, ref = run(q, k, v, mask=mask, causal=causal, sm_scale=0.5 / math.sqrt(D) if seed % 3 == 0 else None,
                   config=SPLIT if split else SMALL)
    if mask_kind == "add_pad" and causal:
        # A causal row whose visible keys are all padded with finfo.min is defined only up to fp32 rounding of
        # score + finfo.min (HF discards such rows): require it finite, compare the other rows exactly.
        visible = torch.arange(Skv, device=out.device)[None, :] <= torch.arange(Sq, device=out.device)[:, None] + Skv - Sq
        real = mask[:, 0, 0, :] > torch.finfo(dtype).min / 2                          # [B, Skv]
        only_padded = visible.any(-1)[None, :] & ~(visible[None] & real[:, None, :]).any(-1)  # [B, Sq]
        assert torch.isfinite(out[only_padded[:, None, :, None].expand_as(out)]).all()
        out = out.masked_fill(only_padded[:, None, :, None], 0.0)
        ref = ref.masked_fill(only_padded[:, None, :, None], 0.0)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_split_halves_match_reference(tma, causal):
    # (37, 37): the second half of the last block runs past seq_q; (50, 33): causal rows that see no key,
    # and a block whose first half is fully masked on the diagonal tile while the second half is not.
    # (An additive bias rather than a finfo.min padding mask: a causal row whose visible keys are all padded
    # is defined only up to fp32 rounding of score + finfo.min, on either path.)
    cfg = dict(SPLIT, TMA=tma)
    for Sq, Skv, mask_kind in ((37, 37, "add"), (50, 33, "bool")):
        q, k, v = make_qkv(2, 4, 2, Sq, Skv, 32, torch.float16)
        if mask_kind == "add":
            mask = torch.randn(4, Sq, Skv, dtype=torch.float16, device=DEVICE)
        else:
            mask = padding_mask(2, Skv)
        out, ref = run(q, k, v, mask=mask, causal=causal, config=cfg)
        assert not torch.isnan(out).any()
        assert_close(out, ref, torch.float16)


def test_split_needs_two_halves_of_16_rows():
    q, k, v = make_qkv(1, 2, 2, 9, 9, 16, torch.float16)
    with pytest.raises(ValueError, match="SPLIT"):
        flash_attention(q, k, v, config=dict(SPLIT, BLOCK_M=16))


def test_fully_masked_rows_are_zero():
    q, k, v = make_qkv(1, 2, 1, 20, 20, 16, torch.float16)
    mask = torch.rand(1, 2, 20, 20, device=DEVICE) > 0.5
    mask[0, 0, 3] = False
    mask[0, 1, 17] = False
    add = torch.zeros(1, 2, 20, 20, dtype=torch.float16, device=DEVICE).masked_fill(~mask, float("-inf"))
    for m in (mask, add):
        out, ref = run(q, k, v, mask=m)
        assert not torch.isnan(out).any()
        assert (out[0, 0, 3] == 0).all() and (out[0, 1, 17] == 0).all()
        assert_close(out, ref, torch.float16)


def test_causal_with_more_queries_than_keys_gives_zero_rows():
    # bottom-right alignment: query i sees keys j <= i + Skv - Sq, so the first Sq - Skv rows see nothing
    q, k, v = make_qkv(1, 2, 2, 40, 25, 16, torch.float16)
    out, ref = run(q, k, v, causal=True)
    assert (out[:, :, :15] == 0).all()
    assert_close(out, ref, torch.float16)


def test_chunked_prefill_matches_full_causal():
    # a chunk of queries against the whole cache = the last rows of full causal attention
    q, k, v = make_qkv(1, 4, 2, 48, 48, 32, torch.float16, q_transposed=False)
    full, _ = run(q, k, v, causal=True)
    chunk, ref = run(q[:, :, 30:], k, v, causal=True)
    assert_close(chunk, ref, torch.float16)
    assert_close(chunk, full[:, :, 30:].double(), torch.float16)


@pytest.mark.parametrize("D", [80, 96])
def test_padded_head_dims(D):
    q, k, v = make_qkv(1, 2, 1, 19, 23, D, torch.float16)
    out, ref = run(q, k, v, causal=True)
    assert_close(out, ref, torch.float16)


@pytest.mark.parametrize("tma", [False, True])
def test_selected_and_candidate_configs_run(tma):
    q, k, v = make_qkv(1, 2, 1, 70, 70, 32, torch.float16)
    cfg = dict(select_config(32, True, 70, 70, 2, torch.float16), TMA=tma)
    cfg.update(BLOCK_M=32, BLOCK_N=32)  # same code path, interpreter-sized tiles
    out, ref = run(q, k, v, causal=True, config=cfg)
    assert_close(out, ref, torch.float16)
    out, ref = run(q, k, v, causal=False, sm_scale=2.0, config=cfg)  # large scale: big exponents
    assert_close(out, ref, torch.float16)


class _KwargSpy:
    """Stands in for the kernel: records each launch's keyword arguments (the constexprs) and runs it."""

    def __init__(self, kernel):
        self.kernel, self.calls, self.grids = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            self.grids.append(grid)
            return self.kernel[grid](*args, **kwargs)
        return launch


# The warp-specialised candidates' shape (128 rows, 4 warps, on-device descriptors), interpreter-sized keys.
WS = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "TMA": True, "DEVICE_TMA": True,
      "WARP_SPEC": True}


def test_device_descriptors_and_warp_spec_flags(monkeypatch):
    """DEVICE_TMA / WARP_SPEC configs run (the interpreter builds the in-kernel descriptors and ignores the
    specialisation itself, so this checks the single-loop kernel the specialised launch uses: masked in
    every tile when seq_k % BLOCK_N != 0) and the launcher passes WS only where it compiles and was right on
    the H200 (2 stages; causal since the 56ca545 probe)."""
    import kernopt.kernels.flash_attention as fa

    spy = _KwargSpy(fa._flash_attention_fwd)
    monkeypatch.setattr(fa, "_flash_attention_fwd", spy)
    # (Sq, Skv, causal, mask, cfg) -> (WARP_SPEC, EVEN_N, DEVICE_TMA) the kernel must get
    cases = [
        ((130, 96, False, None, WS), (True, True, True)),             # 96 keys: whole tiles, no mask arithmetic
        ((130, 70, False, None, WS), (True, False, True)),            # partial last tile: masked loop
        ((70, 130, True, None, WS), (True, False, True)),             # causal: masked loop (right on the H200)
        ((130, 130, True, None, WS), (True, False, True)),
        ((130, 96, False, None, dict(WS, num_stages=3)), (False, False, True)),  # 3 stages: NaN on the H200
        ((40, 64, False, "bool", WS), (False, False, True)),          # a caller mask: not specialised
        ((40, 64, False, None, dict(WS, BLOCK_M=64)), (False, False, True)),  # 64 rows: not specialised
        ((40, 64, False, None, dict(WS, TMA=False)), (False, False, False)),  # pointers
        ((37, 50, True, None, dict(WS, BLOCK_M=32, BLOCK_N=16, WARP_SPEC=False)), (False, False, True)),
    ]
    for (Sq, Skv, causal, mask_kind, cfg), expect in cases:
        q, k, v = make_qkv(1, 4, 2, Sq, Skv, 32, torch.float16)
        mask = padding_mask(1, Skv) if mask_kind == "bool" else None
        spy.calls.clear()
        out, ref = run(q, k, v, mask=mask, causal=causal, config=cfg)
        (kw,) = spy.calls
        assert (kw["WARP_SPEC"], kw["EVEN_N"], kw["DEVICE_TMA"]) == expect, (Sq, Skv, causal, mask_kind, cfg)
        assert not torch.isnan(out).any()
        assert_close(out, ref, torch.float16)


def test_warp_spec_probe_flags_causal_local_rows(monkeypatch):
    """With the launcher's probe flags (WS_CAUSAL, WS_STAGES) causal and 3-stage WS configs are specialised, and
    the specialised loop's causal mask (LOCAL_ROWS: tile-local rows against keys shifted by start_m + seq_k -
    seq_q) matches the reference: several 128-row tiles, partial tiles, more queries than keys (zero rows) and
    more keys than queries. The interpreter ignores the specialisation itself, so this checks the formulation's
    arithmetic; tests/kernels/sm90_offline.py ("ws_rows") checks that the compiled partitions keep it."""
    import kernopt.kernels.flash_attention as fa

    monkeypatch.setattr(fa, "WS_CAUSAL", True)
    monkeypatch.setattr(fa, "WS_STAGES", (2, 3))
    spy = _KwargSpy(fa._flash_attention_fwd)
    monkeypatch.setattr(fa, "_flash_attention_fwd", spy)
    for Sq, Skv, causal, cfg in [(300, 300, True, WS), (130, 70, True, WS), (70, 200, True, dict(WS, num_stages=3)),
                                 (257, 257, False, dict(WS, num_stages=3)), (129, 161, True, dict(WS, BLOCK_N=64))]:
        q, k, v = make_qkv(1, 2, 1, Sq, Skv, 32, torch.float16)
        spy.calls.clear()
        out, ref = run(q, k, v, causal=causal, config=cfg)
        (kw,) = spy.calls
        assert kw["WARP_SPEC"] and kw["CAUSAL"] == causal, (Sq, Skv, causal, cfg)
        assert not torch.isnan(out).any(), (Sq, Skv, causal, cfg)
        assert_close(out, ref, torch.float16)


def test_min_mask_matches_the_exact_masks(monkeypatch):
    """MIN_MASK (the specialised loop's masks as one min per score against a row-minus-column bound): the launcher
    takes it only where every row sees a key in the first tile and the scale is positive, and there it matches the
    reference: several 128-row tiles, partial last tiles, more keys than queries, non-causal partial tiles. A NaN
    in q still reaches that row's output (the min propagates NaN), and only that row's."""
    import kernopt.kernels.flash_attention as fa

    monkeypatch.setattr(fa, "WS_STAGES", (2, 3))
    spy = _KwargSpy(fa._flash_attention_fwd)
    monkeypatch.setattr(fa, "_flash_attention_fwd", spy)
    mm = dict(WS, MIN_MASK=True)
    # 3 stages (WS_STAGES widened above) only under the interpreter: on the H200 the 3-stage specialised loop
    # writes NaN (kernel module docstring; select_config never picks it)
    three = [((70, 200, True, dict(mm, num_stages=3), None), True)] if DEVICE == "cpu" else []
    cases = [((300, 300, True, mm, None), True), *three,
             ((129, 161, True, dict(mm, BLOCK_N=64), None), True), ((130, 70, False, mm, None), True),
             ((130, 70, True, mm, None), False),     # more queries than keys: rows with no key, exact masks
             ((130, 96, False, mm, None), False),    # whole tiles, not causal: no masks at all
             ((200, 200, True, mm, -0.1), False)]    # a negative scale: the exact masks
    for (Sq, Skv, causal, cfg, scale), expect in cases:
        q, k, v = make_qkv(1, 2, 1, Sq, Skv, 32, torch.float16)
        spy.calls.clear()
        out, ref = run(q, k, v, causal=causal, config=cfg, sm_scale=scale)
        (kw,) = spy.calls
        assert kw["WARP_SPEC"] and kw["MIN_MASK"] == expect, (Sq, Skv, causal, cfg, scale)
        assert not torch.isnan(out).any(), (Sq, Skv, causal, cfg, scale)
        assert_close(out, ref, torch.float16)
    q, k, v = make_qkv(1, 2, 1, 150, 150, 32, torch.float16)
    q[0, 1, 140, 3] = float("nan")
    out, _ = run(q, k, v, causal=True, config=mm)
    assert spy.calls[-1]["MIN_MASK"]
    assert torch.isnan(out[0, 1, 140]).all() and not torch.isnan(out[0, 1, :140]).any()
    assert not torch.isnan(out[0, 0]).any() and not torch.isnan(out[0, 1, 141:]).any()


def test_acc_mask_matches_the_reference(monkeypatch):
    """ACC_MASK (the causal mask as the diagonal tile's initial QK^T accumulator, keys walked diagonal first): the
    launcher takes it only on a diagonal of whole square tiles with a positive scale, and there it matches the
    reference: several row blocks, more keys than queries, GQA, persistent or not; elsewhere the other masks.
    Outputs poisoned with NaN."""
    import kernopt.kernels.flash_attention as fa

    spy = _KwargSpy(fa._flash_attention_fwd)
    monkeypatch.setattr(fa, "_flash_attention_fwd", spy)
    am = dict(WS, BLOCK_N=128, MIN_MASK=True, ACC_MASK=True)
    cases = [((256, 256, am, None), True), ((128, 384, am, None), True),
             ((384, 384, dict(am, PERSISTENT=1), None), True),
             ((256, 300, am, None), False),   # seq_k not a multiple of BLOCK_N: MIN_MASK instead
             ((200, 256, am, None), False),   # shift 56: the diagonal off the tile grid (a partial row block)
             ((256, 256, dict(am, BLOCK_N=64), None), False),   # non-square tiles
             ((256, 256, am, -0.2), False)]   # a negative scale: the exact masks
    for (Sq, Skv, cfg, scale), expect in cases:
        q, k, v = make_qkv(1, 4, 2, Sq, Skv, 32, torch.float16)
        spy.calls.clear()
        out, ref = run(q, k, v, causal=True, config=cfg, sm_scale=scale)
        (kw,) = spy.calls
        assert kw["WARP_SPEC"] and kw["ACC_MASK"] == expect, (Sq, Skv, cfg, scale)
        assert not torch.isnan(out).any(), (Sq, Skv, cfg, scale)
        assert_close(out, ref, torch.float16)


def test_persistent_programs_walk_every_tile(monkeypatch):
    """PERSISTENT: PERSISTENT x SMs programs (here 1 SM, so each program walks many tiles) cover every (row block,
    batch x head) tile once, causal in pairs of row blocks (j, n-1-j; an odd n's middle block once): several row
    blocks and heads, GQA, partial tiles, more keys than queries, the warp-specialised tile (MIN_MASK when causal;
    K / V descriptors per program, DESC4; pointer stores, PTR_STORE) and two programs per SM; outputs poisoned with
    NaN."""
    import kernopt.kernels.flash_attention as fa

    monkeypatch.setattr(fa, "sm_count", lambda device: 1)
    spy = _KwargSpy(fa._flash_attention_fwd)
    monkeypatch.setattr(fa, "_flash_attention_fwd", spy)
    small = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "TMA": True}
    cases = [(300, 300, True, dict(WS, MIN_MASK=True, PERSISTENT=1)), (300, 300, False, dict(WS, PERSISTENT=1)),
             (300, 300, True, dict(WS, MIN_MASK=True, PERSISTENT=1, DESC4=True)),
             (130, 70, False, dict(WS, PERSISTENT=1, DESC4=True)),
             (97, 160, True, dict(WS, PERSISTENT=1, PTR_STORE=True)),
             (130, 70, False, dict(WS, PERSISTENT=1, PTR_STORE=True)),
             (130, 70, False, dict(WS, PERSISTENT=1)), (70, 130, True, dict(small, PERSISTENT=2)),
             (97, 97, True, dict(small, TMA=False, PERSISTENT=2)), (97, 160, False, dict(small, PERSISTENT=3))]
    for Sq, Skv, causal, cfg in cases:
        q, k, v = make_qkv(2, 4, 2, Sq, Skv, 32, torch.float16)
        spy.calls.clear()
        spy.grids.clear()
        out, ref = run(q, k, v, causal=causal, config=cfg)
        assert spy.calls[0]["PERSISTENT"] and spy.grids[0] == (cfg["PERSISTENT"],), (Sq, Skv, causal, cfg)
        assert spy.calls[0]["DESC4"] == cfg.get("DESC4", False), (Sq, Skv, causal, cfg)
        assert spy.calls[0]["PTR_STORE"] == cfg.get("PTR_STORE", False), (Sq, Skv, causal, cfg)
        assert not torch.isnan(out).any(), (Sq, Skv, causal, cfg)
        assert_close(out, ref, torch.float16)
    # more programs than tiles: one tile each
    monkeypatch.setattr(fa, "sm_count", lambda device: 132)
    q, k, v = make_qkv(1, 2, 1, 40, 40, 32, torch.float16)
    spy.grids.clear()
    out, ref = run(q, k, v, causal=True, config=dict(small, PERSISTENT=2))
    assert spy.grids[0] == (4,)
    assert_close(out, ref, torch.float16)


def test_default_config_and_allocated_output():
    q, k, v = make_qkv(1, 2, 2, 9, 9, 16, torch.float32)
    out = flash_attention(q, k, v, causal=True)
    assert out.shape == (1, 2, 9, 16) and out.is_contiguous() and out.dtype == torch.float32
    assert mismatch(out, flash_attention_ref(q.double(), k.double(), v.double(), causal=True)) is None


def test_config_table():
    c = select_config(128, False, 2048, 2048, 128, torch.bfloat16)
    assert c["BLOCK_M"] >= 64 and c["num_warps"] >= 4
    assert select_config(32, False, 2048, 2048, 128, torch.float32)["TMA"] is False
    assert select_config(128, False, 1, 4096, 32, torch.bfloat16)["BLOCK_M"] == 16
    assert select_config(256, True, 4096, 4096, 32, torch.bfloat16)["BLOCK_N"] == 64
    cands = candidate_configs(128, True, 4096, 4096, 128, torch.bfloat16)
    assert cands[0] == select_config(128, True, 4096, 4096, 128, torch.bfloat16) and len(cands) > 4
    assert any(c.get("SPLIT") for c in cands)  # the ping-pong variant gets measured, not picked
    assert not any(select_config(128, c, s, s, bh).get("SPLIT") for c in (False, True) for s, bh in
                   ((2048, 128), (8192, 32), (4096, 128)))
    # B8 H16 S1024 D64 causal: a ~69 us kernel, host-bound through TMA descriptors (104 TFLOP/s measured):
    # plain pointers. The large D128 cases keep TMA; a tiny D128 prefill does not.
    assert select_config(64, True, 1024, 1024, 128) == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4,
                                                        "num_stages": 3, "TMA": False}
    assert select_config(64, False, 1024, 1024, 128)["TMA"] is False
    assert select_config(128, True, 2048, 2048, 128)["TMA"] is True
    assert select_config(128, False, 4096, 4096, 128)["TMA"] is True
    assert select_config(128, True, 8192, 8192, 32)["BLOCK_M"] == 128
    assert select_config(128, True, 512, 512, 8)["TMA"] is False
    # Warp specialisation: non-causal D128 prefill large enough for TMA, fp16/bf16, and only where the launch can
    # specialise it (warp_spec=False: a caller mask / tensors unfit for descriptors).
    ws = select_config(128, False, 2048, 2048, 128)
    assert ws["WARP_SPEC"] and ws["DEVICE_TMA"] and (ws["BLOCK_M"], ws["num_warps"], ws["num_stages"]) == (128, 4, 2)
    assert ws["PERSISTENT"] == 1  # one program per SM walks the tiles (H200: sweeps/persistent2)
    assert ws["PTR_STORE"]  # pointer stores of the output (H200: sweeps/ptrstore)
    assert (select_config(128, False, 2048, 2048, 128, warp_spec=False)
            == select_config(128, True, 2048, 2048, 128, warp_spec=False))
    bf16 = torch.bfloat16
    for args in ((128, True, 4096, 2048, 128, bf16, True), (128, True, 2048, 2048, 128, bf16, False),
                 (128, False, 512, 512, 8), (96, False, 4096, 4096, 128), (64, False, 4096, 4096, 128),
                 (128, False, 8, 4096, 128), (128, True, 1024, 1024, 128)):
        assert not select_config(*args).get("WARP_SPEC"), args
    # causal D128 (S >= 2048, seq_k >= seq_q): the WS tile with ACC_MASK (MIN_MASK where the diagonal is not on whole
    # tiles), persistent (H200 sweeps)
    for s in (2048, 4096, 8192):
        c = select_config(128, True, s, s, 128 if s == 2048 else 32)
        assert c["WARP_SPEC"] and c["MIN_MASK"] and c["PERSISTENT"] == 1 and c["BLOCK_N"] == 128 and c["PTR_STORE"], c
        assert c["ACC_MASK"], c
    assert not select_config(128, False, 4096, 4096, 128, torch.float32).get("WARP_SPEC")


def test_table_pick_drops_warp_spec_where_the_launch_cannot_specialise(monkeypatch):
    """config=None: a caller mask or a q unfit for descriptors gets the unspecialised table tile, not the WS tile
    unspecialised (128 rows on 4 warps); without either the WS tile is launched specialised."""
    import kernopt.kernels.flash_attention as fa

    spy = _KwargSpy(fa._flash_attention_fwd)
    monkeypatch.setattr(fa, "_flash_attention_fwd", spy)
    monkeypatch.setattr(fa, "_SMALL_FLOPS", 0)  # interpreter-sized shapes count as large
    q, k, v = make_qkv(1, 2, 1, 40, 40, 128, torch.float16)
    q_odd = torch.randn(1, 2, 40, 132, dtype=torch.float16, device=DEVICE)[..., :128]  # row stride 264 B: not 16-B
    for qq, mask, ws in ((q, None, True), (q, padding_mask(1, 40), False), (q_odd, None, False)):
        spy.calls.clear()
        out, ref = run(qq, k, v, mask=mask, causal=False, config=None)
        (kw,) = spy.calls
        assert kw["WARP_SPEC"] == ws and (kw["BLOCK_M"] == 128) == ws, (mask is not None, qq.stride())
        assert_close(out, ref, torch.float16)


@settings(max_examples=300, deadline=None)
@given(shape=st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 7]), max_size=6),
       target=st.tuples(*[st.sampled_from([1, 2, 4, 5])] * 4))
def test_mask_fit_is_broadcast_shapes(shape, target):
    """supports()' own mask check gives torch.broadcast_shapes' verdict (broadcastable to the [B, Hq, Sq, Skv] target
    and no larger than it) on every shape, 5- and 6-D and zero-sized dims included."""
    from kernopt.kernels.flash_attention import _mask_fit

    try:
        full = torch.broadcast_shapes(tuple(shape), target)
        expected = "broadcasts beyond" if len(shape) > 4 or full != target else None
    except RuntimeError:
        expected = "not broadcastable to"
    assert _mask_fit(tuple(shape), target) == expected


def test_supports_reasons():
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16, torch.float16)
    assert supports(q, k, v) is None
    assert supports(q, k, v, torch.ones(1, 1, 8, 8, dtype=torch.bool, device=DEVICE)) is None
    assert "dtype" in supports(q.double(), k.double(), v.double())
    assert "multiple" in supports(q, k[:, :1].expand(1, 3, 8, 16), v[:, :1].expand(1, 3, 8, 16))
    assert "not broadcastable" in supports(q, k, v, torch.ones(1, 1, 8, 5, dtype=torch.bool, device=DEVICE))
    assert "beyond" in supports(q, k, v, torch.ones(2, 1, 8, 8, dtype=torch.bool, device=DEVICE))
    assert "beyond" in supports(q, k, v, torch.ones(1, 1, 1, 8, 8, dtype=torch.bool, device=DEVICE))
    assert "mask dtype" in supports(q, k, v, torch.ones(1, 1, 8, 8, dtype=torch.int32, device=DEVICE))
    big = torch.randn(1, 4, 8, 512, dtype=torch.float16, device=DEVICE)
    assert "head dim" in supports(big, big[:, :2], big[:, :2])
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(big, big[:, :2], big[:, :2])


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128, 96, 256])
def test_bf16_gpu_default_configs(causal, D):
    B, Hq, Hkv, S = 2, 8, 2, 1000
    q, k, v = make_qkv(B, Hq, Hkv, S, S, D, torch.bfloat16)
    mask = padding_mask(B, S)
    for m in (None, mask):
        out, ref = run(q, k, v, mask=m, causal=causal, config=None)
        assert_close(out, ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_gpu_warp_spec_candidates(causal):
    """The DEVICE_TMA candidates (warp-specialised and not) at whole tiles, GQA and a strided q, and with a
    caller mask (the launcher drops the specialisation there); the launches set Triton's scratch allocator."""
    import triton.runtime._allocation as alloc

    B, Hq, Hkv, S = 2, 8, 2, 1024
    q, k, v = make_qkv(B, Hq, Hkv, S, S, 128, torch.bfloat16)
    cfgs = [c for c in candidate_configs(128, causal, S, S, B * Hq, torch.bfloat16) if c.get("DEVICE_TMA")]
    assert any(c.get("WARP_SPEC") for c in cfgs)
    for cfg in cfgs:
        for m in (None, padding_mask(B, S)):
            out, ref = run(q, k, v, mask=m, causal=causal, config=cfg)
            assert mismatch(out, ref, torch.bfloat16) is None, (cfg, m is not None)
    assert not isinstance(alloc._allocator.get(), alloc.NullAllocator)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [1024, 1000])
def test_bf16_gpu_warp_spec_causal_probe_flag(monkeypatch, S):
    """Causal warp specialisation (WS_CAUSAL, on since the 56ca545 H200 probe; set here too so that the test
    keeps checking it if the default changes): 2 stages, 128x64 and 128x128 tiles, GQA, whole and partial last tiles."""
    import kernopt.kernels.flash_attention as fa

    monkeypatch.setattr(fa, "WS_CAUSAL", True)
    B, Hq, Hkv = 2, 8, 2
    q, k, v = make_qkv(B, Hq, Hkv, S, S, 128, torch.bfloat16)
    for bn in (64, 128):
        cfg = dict(WS, BLOCK_N=bn)
        out, ref = run(q, k, v, causal=True, config=cfg)
        assert not torch.isnan(out).any(), cfg
        assert mismatch(out, ref, torch.bfloat16) is None, cfg


@pytest.mark.gpu
@pytest.mark.parametrize("S", [2048, 2000])
def test_bf16_gpu_persistent_programs_walk_many_tiles(S):
    """The PERSISTENT candidates (the non-causal table pick among them) at a grid of 4-8 tiles per program: GQA,
    whole and partial last tiles, causal and not, against the float64 reference, outputs poisoned with NaN."""
    B, Hq, Hkv = 2, 16, 4
    q, k, v = make_qkv(B, Hq, Hkv, S, S, 128, torch.bfloat16)
    for causal in (False, True):
        cfgs = [c for c in candidate_configs(128, causal, S, S, B * Hq, torch.bfloat16) if c.get("PERSISTENT")]
        assert cfgs
        for cfg in cfgs:
            out, ref = run(q, k, v, causal=causal, config=cfg)
            assert not torch.isnan(out).any(), cfg
            assert mismatch(out, ref, torch.bfloat16) is None, cfg


@pytest.mark.gpu
def test_bf16_gpu_all_candidates():
    q, k, v = make_qkv(2, 8, 2, 777, 777, 128, torch.bfloat16)
    for causal in (False, True):
        ref = flash_attention_ref(q.double(), k.double(), v.double(), causal=causal)
        for cfg in candidate_configs(128, causal, 777, 777, 16, torch.bfloat16):
            out, _ = run(q, k, v, causal=causal, config=cfg)
            assert mismatch(out, ref, torch.bfloat16) is None, cfg


# ------------------------------------------------------------------------------------------------
# BOUNDS: a caller's mask walks only the key tiles its rows see (mask_rows), unmasked where it alters nothing
# ------------------------------------------------------------------------------------------------
def _structured_masks(B, Sq, Skv):
    """name -> bool keep [B, 1, Sq, Skv] (True = attend): the shapes whose whole tiles the bounds skip."""
    i = torch.arange(Sq)[:, None]
    j = torch.arange(Skv)[None, :]
    pad = torch.randint(0, Sq // 2, (B,))
    holes = torch.rand(B, 1, Sq, Skv) > 0.4
    holes[..., : Skv // 3] = False  # a run of whole empty tiles before the random part
    dead = (j <= i).expand(B, 1, Sq, Skv).clone()
    dead[:, :, 3:20] = False  # query rows (a whole 16-row block among them) that see no key
    return {
        # HF's static-cache prompt: causal from the top left, the cache's unfilled slots hidden
        "static_cache": (j <= i).expand(B, 1, Sq, Skv),
        "left_pad_causal": (j <= i)[None, None] & (j[None, None] >= pad[:, None, None, None]),
        "sliding_window": ((j <= i) & (j > i - 20)).expand(B, 1, Sq, Skv),
        "holes": holes,
        "dead_rows": dead,
        "all": torch.ones(B, 1, Sq, Skv, dtype=torch.bool),
    }


def _rows_ref(seen: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """mask_rows's definition, row by row in Python: seen / plain [Sq, Skv] bool of one (batch, head)."""
    Sq, Skv = seen.shape
    out = []
    for r in range(Sq):
        cols = seen[r].nonzero().flatten().tolist()
        pcols = plain[r].nonzero().flatten().tolist()
        f = pcols[0] if pcols else Skv
        e = next((c for c in range(f + 1, Skv) if not plain[r, c]), Skv)
        out.append([cols[0] if cols else Skv, cols[-1] + 1 if cols else 0, f, e])
    return torch.tensor(out, dtype=torch.int32)


@pytest.mark.parametrize("kind", ["bool", "additive_inf", "additive_finite"])
@pytest.mark.parametrize("Skv", [71, 1500])  # one step of keys, and two of 1024
def test_mask_rows_match_their_definition(kind, Skv):
    from kernopt.kernels.flash_attention import _broadcast_mask, mask_rows

    B, H, Sq = 2, 3, 45  # rows: not a multiple of the kernel's 4
    for name, keep in _structured_masks(B, Sq, Skv).items():
        keep = keep.to(DEVICE)
        if kind == "bool":
            mask, arg, mk = keep, keep.view(torch.uint8), 1
        else:
            hidden = float("-inf") if kind == "additive_inf" else torch.finfo(torch.float16).min
            mask = torch.zeros(keep.shape, dtype=torch.float16, device=DEVICE).masked_fill(~keep, hidden)
            mask[..., ::7, 5] = 0.5  # a finite, non-zero entry: seen, but not plain
            arg, mk = mask, 2
        got = mask_rows(_broadcast_mask(arg, (B, H, Sq, Skv)), mk)
        assert got.shape == (B, H, Sq, 4)
        for b in range(B):
            if kind == "bool":
                seen = plain = keep[b, 0].cpu()
            else:
                mb = mask[b, 0].float().cpu()
                seen, plain = mb != float("-inf"), mb == 0
            want = _rows_ref(seen, plain)
            for h in range(H):
                assert torch.equal(got[b, h].cpu(), want), (name, kind, b, h)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("mask_dtype", ["bool", "additive"])
@pytest.mark.parametrize("cfg", [SMALL, {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}],
                         ids=["16x16", "32x64"])
def test_bounded_masks_match_reference(dtype, mask_dtype, cfg, monkeypatch):
    """Every structured mask, through the bounded loops and with KERNOPT_MASK_BOUNDS=0: the reference's answer
    either way (rows that see no key: zeros, test_fully_masked_rows_are_zero)."""
    import kernopt.kernels.flash_attention as fa

    spy = _KwargSpy(fa._flash_attention_fwd)
    monkeypatch.setattr(fa, "_flash_attention_fwd", spy)
    B, Sq, Skv = 2, 45, 71
    q, k, v = make_qkv(B, 4, 2, Sq, Skv, 32, dtype)
    for name, keep in _structured_masks(B, Sq, Skv).items():
        keep = keep.to(DEVICE)
        mask = keep if mask_dtype == "bool" else torch.zeros(
            keep.shape, dtype=dtype, device=DEVICE).masked_fill(~keep, float("-inf"))
        for bounds in ("1", "0"):
            monkeypatch.setenv("KERNOPT_MASK_BOUNDS", bounds)
            spy.calls.clear()
            out, ref = run(q, k, v, mask=mask, config=cfg)
            assert spy.calls[-1]["BOUNDS"] is (bounds == "1"), name
            ref = torch.nan_to_num(ref, nan=0.0)  # the reference's rows without a key are 0/0
            assert_close(out, ref, dtype), (name, bounds)


def test_bounds_only_where_the_loops_take_them(monkeypatch):
    import kernopt.kernels.flash_attention as fa

    spy = _KwargSpy(fa._flash_attention_fwd)
    monkeypatch.setattr(fa, "_flash_attention_fwd", spy)
    q, k, v = make_qkv(1, 2, 2, 40, 40, 32, torch.float16)
    keep = padding_mask(1, 40)
    for mask, causal, cfg, want in ((keep, False, SMALL, True), (keep, True, SMALL, False),
                                    (None, False, SMALL, False), (keep, False, SPLIT, False)):
        spy.calls.clear()
        out, ref = run(q, k, v, mask=mask, causal=causal, config=cfg)
        assert spy.calls[-1]["BOUNDS"] is want, (mask is None, causal, cfg)
        assert_close(out, torch.nan_to_num(ref, nan=0.0), torch.float16)
