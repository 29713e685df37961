"""Decode attention (contiguous and paged) vs a float64 reference that gathers pages and runs softmax attention.

On CPU the Triton kernels run under the interpreter (fp16/fp32, small shapes); bf16 and suite shapes on the GPU.
Outputs are NaN-poisoned before the kernel writes; unused page slots and spare pages of the pool are NaN too, so
a kernel that reads past a sequence's length (or multiplies a zero weight by garbage) fails.
"""
import importlib
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kernopt.kernels import decode_attention as da
from kernopt.tolerance import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32]


def small_config(block_n=16, splits=1, block_m=16, fused=False, merge_chunk=None):
    cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLITS": splits, "num_warps": 4, "num_stages": 1}
    if fused:
        cfg["FUSED_MERGE"] = True
    if merge_chunk is not None:
        cfg["MERGE_CHUNK"] = merge_chunk
    return cfg


def counters():
    """The fused merge's arrival counters on this device and stream (the buffer the launcher hands the kernel)."""
    return da._arrival_counters(torch.device(DEVICE), 1)


def make_paged(k, v, lens, page_size, spare=3, poison=True):
    """Scatter contiguous k/v [B, Hkv, S, D] into a shuffled NaN-poisoned pool; table padded with junk ids."""
    B, hkv, S, D = k.shape
    lens = lens.tolist() if torch.is_tensor(lens) else list(lens)
    pages_per_seq = [max(1, math.ceil(int(n) / page_size)) for n in lens]
    num_pages = sum(pages_per_seq) + spare
    fill = float("nan") if poison else 0.0
    kp = torch.full((num_pages, page_size, hkv, D), fill, dtype=k.dtype, device=k.device)
    vp = torch.full_like(kp, fill)
    perm = torch.randperm(num_pages).tolist()
    max_pages = max(pages_per_seq) + 1  # one junk column: never read
    table = torch.full((B, max_pages), 10 ** 6, dtype=torch.int32)
    at = 0
    for b in range(B):
        n = int(lens[b])
        for p in range(pages_per_seq[b]):
            page = perm[at]
            at += 1
            table[b, p] = page
            lo, hi = p * page_size, min((p + 1) * page_size, n)
            if hi > lo:
                kp[page, : hi - lo] = k[b, :, lo:hi].transpose(0, 1)
                vp[page, : hi - lo] = v[b, :, lo:hi].transpose(0, 1)
    return kp, vp, table.to(k.device)


def rand_case(B, hq, hkv, sq, S, D, dtype):
    q = torch.randn(B, hq, sq, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, hkv, S, D, dtype=dtype, device=DEVICE)
    v = torch.randn(B, hkv, S, D, dtype=dtype, device=DEVICE)
    return q, k, v


def poisoned_out(q):
    return torch.full_like(q, float("nan"))


def check_paged(q, k, v, lens, page_size, config, dtype):
    kp, vp, table = make_paged(k, v, lens, page_size)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE) if not torch.is_tensor(lens) else lens
    out = poisoned_out(q)
    got = da.paged_decode_attention(q, kp, vp, table, lens_t, config=config, out=out)
    assert got.data_ptr() == out.data_ptr()
    # The reference gathers the (poisoned) pages itself; it must agree with the contiguous reference.
    ref = da.paged_decode_attention_ref(q.double(), kp.double(), vp.double(), table, lens_t)
    ref_contig = da.decode_attention_ref(q.double(), k.double(), v.double(), lens_t)
    assert_close(ref, ref_contig, dtype=torch.float64)
    assert_close(got, ref, dtype=dtype)


def check_contiguous(q, k, v, lens, config, dtype):
    """Contiguous cache with per-sequence lengths; keys past each length are NaN, so reading them fails."""
    k, v = k.clone(), v.clone()
    for b, n in enumerate(lens):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = poisoned_out(q)
    got = da.decode_attention(q, k, v, lens_t, config=config, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_close(got, da.decode_attention_ref(q.double(), k.double(), v.double(), lens_t), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Paged: lengths around page boundaries, GQA ratios 1/4/8, fp16/fp32
# ---------------------------------------------------------------------------------------------------------------
PAGE = 16


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(3, 3), (8, 2), (8, 1)])
@pytest.mark.parametrize("length", [1, PAGE - 1, PAGE, PAGE + 1, 5 * PAGE + 3])
def test_paged_lengths_gqa(dtype, hq, hkv, length):
    q, k, v = rand_case(2, hq, hkv, 1, length, 24, dtype)
    lens = [length, max(1, length - 2)]
    # splits=2 so that short sequences also exercise empty splits and the merge.
    check_paged(q, k, v, lens, PAGE, small_config(block_n=16, splits=2), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq", [1, 3, 8])
def test_paged_ragged_batch_speculative(dtype, sq):
    lens = [1, 7, 16, 17, 70, 0]
    S = max(lens)
    q, k, v = rand_case(len(lens), 8, 2, sq, S, 32, dtype)
    check_paged(q, k, v, lens, PAGE, small_config(block_n=16, splits=3), dtype)


@pytest.mark.parametrize("page_size,block_n", [(8, 16), (32, 16), (16, 32), (12, 16), (64, 16)])
def test_paged_page_size_vs_tile(page_size, block_n):
    """Tile inside one page (page % BLOCK_N == 0) and tiles spanning pages (row-wise table lookups).

    The table entries are prefetched one tile ahead; (64, 16) starts a split in the middle of a page (45 keys,
    2 splits: the second starts at key 32), so the first prefetch is not at a page boundary."""
    lens = [45, 9, 64]
    q, k, v = rand_case(3, 4, 2, 2, max(lens), 16, torch.float16)
    check_paged(q, k, v, lens, page_size, small_config(block_n=block_n, splits=2), torch.float16)


def test_paged_default_config():
    lens = [33, 100]
    q, k, v = rand_case(2, 8, 2, 1, max(lens), 32, torch.float32)
    check_paged(q, k, v, lens, 64, None, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Contiguous cache (HF static/dynamic layout)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq", [1, 4])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("with_lens", [False, True])
def test_contiguous(dtype, sq, splits, with_lens):
    B, hq, hkv, S, D = 3, 8, 2, 53, 40  # D not a power of two: padded and masked
    q, k, v = rand_case(B, hq, hkv, sq, S, D, dtype)
    lens = torch.tensor([53, 20, 1], dtype=torch.int32, device=DEVICE) if with_lens else None
    if with_lens:  # garbage past each length must not be read
        for b, n in enumerate(lens.tolist()):
            k[b, :, n:] = float("nan")
            v[b, :, n:] = float("nan")
    out = poisoned_out(q)
    got = da.decode_attention(q, k, v, lens, config=small_config(splits=splits), out=out)
    ref = da.decode_attention_ref(q.double(), k.double(), v.double(), lens)
    assert_close(got, ref, dtype=dtype)


def test_contiguous_strided_like_hf():
    """q and k/v as transposes of [B, S, H, D] (what HF projections give), scale given explicitly."""
    B, hq, hkv, S, D = 2, 4, 4, 30, 16
    q = torch.randn(B, 2, hq, D, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, S, hkv, D, device=DEVICE).transpose(1, 2)
    v = torch.randn(B, S, hkv, D, device=DEVICE).transpose(1, 2)
    got = da.decode_attention(q, k, v, sm_scale=0.3, config=small_config(splits=2))
    ref = da.decode_attention_ref(q.double(), k.double(), v.double(), sm_scale=0.3)
    assert_close(got, ref, dtype=torch.float32)


def test_custom_op_seam_matches_reference():
    importlib.import_module("kernopt.ops")  # registers torch.ops.kernopt.*

    lens = [20, 5]
    q, k, v = rand_case(2, 4, 1, 1, max(lens), 16, torch.float32)
    kp, vp, table = make_paged(k, v, lens, 8)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    got = torch.ops.kernopt.paged_decode_attention(q, kp, vp, table, lens_t, 0.25)
    assert_close(got, da.decode_attention_ref(q.double(), k.double(), v.double(), lens_t, 0.25), dtype=torch.float32)
    got = torch.ops.kernopt.decode_attention(q, k, v, lens_t, 0.25)
    assert_close(got, da.decode_attention_ref(q.double(), k.double(), v.double(), lens_t, 0.25), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Fused merge (FUSED_MERGE): the split that arrives last merges; arrival counters re-armed to zero
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,sq", [(torch.float16, 1), (torch.float32, 3)])
@pytest.mark.parametrize("hq,hkv", [(3, 3), (8, 2), (8, 1)])
@pytest.mark.parametrize("length", [1, PAGE - 1, PAGE, PAGE + 1, 5 * PAGE + 3])
def test_fused_merge_lengths_gqa(dtype, sq, hq, hkv, length):
    """Paged and contiguous, both through the fused merge: 3 splits of 16-key tiles, so the short lengths
    leave splits empty; a ragged second sequence; every counter back at zero afterwards."""
    lens = [length, max(1, length - 2)]
    q, k, v = rand_case(2, hq, hkv, sq, length, 24, dtype)
    check_paged(q, k, v, lens, PAGE, small_config(block_n=16, splits=3, fused=True), dtype)
    check_contiguous(q, k, v, lens, small_config(block_n=16, splits=2, fused=True), dtype)
    assert not counters().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq", [1, 3])
def test_fused_merge_ragged_batch_with_empty_sequence(dtype, sq):
    """Ragged lengths around the page size and a length-0 sequence (its rows must be zeros, not NaN)."""
    lens = [1, PAGE - 1, PAGE, PAGE + 1, 70, 0]
    q, k, v = rand_case(len(lens), 8, 2, sq, max(lens), 16, dtype)
    check_paged(q, k, v, lens, PAGE, small_config(block_n=16, splits=3, fused=True), dtype)
    out = da.paged_decode_attention(q, *make_paged(k, v, lens, PAGE),
                                    torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                                    config=small_config(block_n=16, splits=3, fused=True), out=poisoned_out(q))
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    assert not counters().any()


def test_fused_merge_all_empty_gives_zeros():
    """Every sequence of length 0: every split is empty (lse = -inf), the merge must give 0, never NaN."""
    q, k, v = rand_case(2, 4, 1, 2, 8, 16, torch.float32)
    lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    for splits in (2, 5):
        cfg = small_config(splits=splits, fused=True)
        got = da.decode_attention(q, k, v, lens, config=cfg, out=poisoned_out(q))
        assert torch.equal(got, torch.zeros_like(got))
        kp, vp, table = make_paged(k, v, [0, 0], 4)
        got = da.paged_decode_attention(q, kp, vp, table, lens, config=cfg, out=poisoned_out(q))
        assert torch.equal(got, torch.zeros_like(got))
    assert not counters().any()


@pytest.mark.parametrize("splits,merge_chunk", [(7, None), (7, 1), (7, 2), (5, 4), (12, 8)])
def test_fused_merge_long_many_splits_and_chunks(splits, merge_chunk):
    """A long sequence (many tiles per split), more splits than tiles for the short one, and the merge
    reading the splits in chunks (MERGE_CHUNK) that don't divide the split count."""
    lens = [333, 20, 64]
    q, k, v = rand_case(3, 8, 1, 2, max(lens), 32, torch.float32)
    cfg = small_config(block_n=16, splits=splits, fused=True, merge_chunk=merge_chunk)
    check_paged(q, k, v, lens, PAGE, cfg, torch.float32)
    check_contiguous(q, k, v, lens, cfg, torch.float32)
    assert not counters().any()


@pytest.mark.parametrize("paged", [False, True])
def test_fused_merge_repeat_calls_rearm_counters(paged):
    """Consecutive calls share the counter buffer: the same inputs give the same answer bit for bit (the
    merge is in split order), and new inputs after that are right (a counter left non-zero would make the
    merge never run, leaving NaN in `out`, or run early)."""
    lens = [45, 9, 64]
    cfg = small_config(block_n=16, splits=4, fused=True)
    assert not counters().any()
    results = []
    for trial in range(3):
        if trial != 1:  # trial 1 repeats trial 0's inputs
            q, k, v = rand_case(3, 4, 2, 2, max(lens), 16, torch.float16)
        if paged:
            kp, vp, table = make_paged(k, v, lens, 8, poison=False)
            lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
            got = da.paged_decode_attention(q, kp, vp, table, lens_t, config=cfg, out=poisoned_out(q))
        else:
            lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
            got = da.decode_attention(q, k, v, lens_t, config=cfg, out=poisoned_out(q))
        assert_close(got, da.decode_attention_ref(q.double(), k.double(), v.double(), lens_t), dtype=torch.float16)
        assert not counters().any()
        results.append(got)
    assert torch.equal(results[0], results[1])


def test_fused_merge_matches_merge_kernel():
    """Same config with either merge: the same partials, merged in fp32 two ways, agree to fp32 rounding."""
    lens = [100, 37]
    q, k, v = rand_case(2, 8, 2, 4, max(lens), 32, torch.float32)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    a = da.decode_attention(q, k, v, lens_t, config=small_config(splits=5), out=poisoned_out(q))
    b = da.decode_attention(q, k, v, lens_t, config=small_config(splits=5, fused=True), out=poisoned_out(q))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_fused_merge_config_checks():
    q, k, v = rand_case(1, 4, 2, 1, 40, 16, torch.float32)
    with pytest.raises(ValueError, match="MERGE_CHUNK"):
        da.decode_attention(q, k, v, config=small_config(splits=3, fused=True, merge_chunk=3))
    # FUSED_MERGE with one split is the plain one-kernel path (no partials, no counters)
    got = da.decode_attention(q, k, v, config=small_config(splits=1, fused=True), out=poisoned_out(q))
    assert_close(got, da.decode_attention_ref(q.double(), k.double(), v.double()), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Hypothesis: lengths, page sizes, GQA ratios, query lengths and splits together
# ---------------------------------------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(
    lens=st.lists(st.integers(0, 50), min_size=1, max_size=3),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 4, 8]),
    sq=st.integers(1, 4),
    page_size=st.sampled_from([4, 8, 16]),
    splits=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
)
def test_paged_hypothesis(lens, hkv, group, sq, page_size, splits, dtype):
    torch.manual_seed(len(lens) * 1000 + sum(lens))
    q, k, v = rand_case(len(lens), hkv * group, hkv, sq, max(max(lens), 1), 16, dtype)
    check_paged(q, k, v, lens, page_size, small_config(block_n=16, splits=splits), dtype)


@st.composite
def boundary_case(draw):
    """A page size and a ragged batch whose lengths favour the issue's list: 0, 1, page_size - 1, page_size,
    page_size + 1, a long one (many tiles and pages), or anything in between."""
    page_size = draw(st.sampled_from([4, 8, 16]))
    special = st.sampled_from([0, 1, page_size - 1, page_size, page_size + 1, 7 * page_size + 5, 150])
    lens = draw(st.lists(st.one_of(special, st.integers(0, 60)), min_size=1, max_size=3))
    return page_size, lens


@settings(max_examples=16, deadline=None)
@given(
    case=boundary_case(),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 4, 8]),
    sq=st.sampled_from([1, 2, 4]),
    splits=st.integers(1, 6),
    fused=st.booleans(),
    dtype=st.sampled_from(DTYPES),
)
def test_hypothesis_boundaries_both_caches(case, hkv, group, sq, splits, fused, dtype):
    """Lengths around page boundaries and long ones, GQA 1/4/8, q_len, splits (often more than tiles) and
    either merge, on the paged and the contiguous cache."""
    page_size, lens = case
    torch.manual_seed(len(lens) * 1000 + sum(lens) + page_size)
    q, k, v = rand_case(len(lens), hkv * group, hkv, sq, max(max(lens), 1), 16, dtype)
    cfg = small_config(block_n=16, splits=splits, fused=fused)
    check_paged(q, k, v, lens, page_size, cfg, dtype)
    check_contiguous(q, k, v, lens, cfg, dtype)
    assert not counters().any()


# ---------------------------------------------------------------------------------------------------------------
# Input checks and the config table
# ---------------------------------------------------------------------------------------------------------------
MASK_SHAPES = {"B11S": lambda B, hq, sq, S: (B, 1, 1, S), "BHqSqS": lambda B, hq, sq, S: (B, hq, sq, S),
               "S": lambda B, hq, sq, S: (S,), "11SqS": lambda B, hq, sq, S: (1, 1, sq, S)}


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("shape", list(MASK_SHAPES))
@pytest.mark.parametrize("splits,fused", [(1, False), (3, False), (4, True)])
def test_contiguous_mask(kind, shape, splits, fused):
    """A bool / additive mask (HF's static-cache decode mask and other broadcasts) on top of lengths."""
    torch.manual_seed(splits + len(shape))
    B, hq, hkv, sq, S, D = 3, 8, 2, (1 if shape != "BHqSqS" else 2), 45, 16
    q, k, v = rand_case(B, hq, hkv, sq, S, D, torch.float32)
    lens = torch.tensor([45, 30, 7], dtype=torch.int32, device=DEVICE)
    keep = torch.rand(MASK_SHAPES[shape](B, hq, sq, S), device=DEVICE) > 0.4
    if shape == "B11S":
        keep[2] = False  # a sequence that sees no key at all: zeros
    if kind == "bool":
        mask = keep
    else:  # -inf and HF's finfo.min both mean "masked"; finite values shift the scores
        mask = torch.randn(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf"))
        if shape == "BHqSqS":
            mask = mask.masked_fill(~keep & (torch.rand(keep.shape, device=DEVICE) > 0.5), torch.finfo(torch.float32).min)
    out = poisoned_out(q)
    got = da.decode_attention(q, k, v, lens, config=small_config(splits=splits, fused=fused), out=out, mask=mask)
    want = da.decode_attention_ref(q.double(), k.double(), v.double(), lens, mask=mask)
    rows_ok = torch.isfinite(want)  # finfo.min rows without -inf-free keys: finite, compared loosely below
    assert torch.isfinite(got).all()
    assert_close(got[rows_ok], want[rows_ok], torch.float32)
    if shape == "B11S":
        assert torch.equal(got[2], torch.zeros_like(got[2]))
    if fused:
        assert int(counters().count_nonzero()) == 0


def test_mask_checks():
    q, k, v = rand_case(1, 4, 2, 1, 9, 16, torch.float32)
    with pytest.raises(ValueError, match="not broadcastable"):
        da.decode_attention(q, k, v, mask=torch.ones(1, 1, 1, 8, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="mask dtype"):
        da.decode_attention(q, k, v, mask=torch.ones(1, 1, 1, 9, dtype=torch.int32, device=DEVICE))


def test_rejects_bad_inputs():
    q, k, v = rand_case(1, 4, 2, 1, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="query length"):
        da.decode_attention(torch.randn(1, 4, 9, 16, device=DEVICE), k, v)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        da.decode_attention(torch.randn(1, 3, 1, 16, device=DEVICE), k, v)
    with pytest.raises(ValueError, match="dtypes differ"):
        da.decode_attention(q.half(), k, v)
    with pytest.raises(ValueError, match="block_table"):
        da.paged_decode_attention(q, k.new_zeros(2, 4, 2, 16), v.new_zeros(2, 4, 2, 16),
                                  torch.zeros(2, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="out must be"):
        da.decode_attention(q, k, v, out=torch.empty(1, 4, 1, 8, device=DEVICE))


def test_select_config_table():
    # B1 S8192 Hkv8: 8 programs can't fill 132 SMs -> split; each split keeps >= 4 tiles.
    cfg = da.select_config(1, 8, 32, 8192, 128, 132)
    assert cfg["SPLITS"] > 8 and 8192 / cfg["SPLITS"] >= 4 * cfg["BLOCK_N"]
    assert 64 <= cfg["BLOCK_N"] <= 128 and 2 <= cfg["num_stages"] <= 4
    # B128 Hkv8: 1024 programs already fill the GPU.
    assert da.select_config(128, 8, 32, 2048, 128, 132)["SPLITS"] == 1
    # short sequences are not split into sub-tile chunks
    assert da.select_config(1, 8, 32, 64, 128, 132)["SPLITS"] == 1
    # speculative verification with a wide group pads the query tile
    assert da.select_config(1, 1, 8, 1024, 64, 132, q_len=8)["BLOCK_M"] == 64
    for c in da.candidate_configs(1, 8, 32, 8192, 128, 132):
        assert c["SPLITS"] >= 1 and c["BLOCK_N"] in (32, 64, 128)
    # Rows from the H200 sweep: B1 S8192 takes the default row, paged or not (64-token tiles, 32 splits) ...
    for paged in (False, True):
        cfg = da.select_config(1, 8, 32, 8192, 128, 132, paged=paged)
        assert (cfg["BLOCK_N"], cfg["SPLITS"], cfg["num_warps"], cfg["num_stages"]) == (64, 32, 4, 3)
    # ... B8 S32768: 4 splits, contiguous with 128-token tiles, paged with 64-token tiles on 8 warps.
    contig = da.select_config(8, 8, 32, 32768, 128, 132)
    assert (contig["BLOCK_N"], contig["SPLITS"], contig["num_warps"]) == (128, 4, 4)
    paged = da.select_config(8, 8, 32, 32768, 128, 132, paged=True)
    assert (paged["BLOCK_N"], paged["SPLITS"], paged["num_warps"]) == (64, 4, 8)
    # D128 aims at 2 programs per SM, rounded down (the H200 A/B in select_config's comment): B1 S32768 33 splits
    # (not 66), B32 S4096 one split (256 programs, not 768)
    for paged in (False, True):
        assert da.select_config(1, 8, 32, 32768, 128, 132, paged=paged)["SPLITS"] == 33
        assert da.select_config(32, 8, 32, 4096, 128, 132, paged=paged)["SPLITS"] == 1
        # past one wave of 3-stage programs (3 per SM), 4 stages; up to it, 3
        assert da.select_config(64, 8, 32, 4096, 128, 132, paged=paged)["num_stages"] == 4
        assert da.select_config(48, 8, 32, 4096, 128, 132, paged=paged)["num_stages"] == 3
        # nearly one program per SM runs unsplit (contiguous from B12 at Hkv 8, paged from B16); B8 keeps its 4
        assert da.select_config(12, 8, 32, 4096, 128, 132, paged=paged)["SPLITS"] == (2 if paged else 1)
        assert da.select_config(16, 8, 32, 16384, 128, 132, paged=paged)["SPLITS"] == 1
    assert any(c["BLOCK_N"] == 64 and c["num_stages"] == 3 for c in da.candidate_configs(1, 8, 32, 8192, 128,
                                                                                          paged=True))
    # short caches (>= 256 tokens): 8 splits of one or two tiles (the H200 sweep's best at S256 / S1024); the
    # sweep also tries 1-4 splits, with both merges; below 256 tokens the table keeps 1 split
    for paged in (False, True):
        s256 = da.select_config(1, 8, 32, 256, 128, 132, paged=paged)
        assert (s256["BLOCK_N"], s256["SPLITS"]) == (32, 8)
        s1k = da.select_config(1, 8, 32, 1024, 128, 132, paged=paged)
        assert (s1k["BLOCK_N"], s1k["SPLITS"]) == (64, 8)
    assert da.select_config(1, 8, 32, 200, 128, 132)["SPLITS"] == 1
    # the short-cache row is only for a GPU that wants >= 8 programs per (sequence, KV head)
    assert da.select_config(32, 8, 32, 256, 128, 132)["SPLITS"] == 1
    short = da.candidate_configs(1, 8, 32, 256, 128, 132)
    assert {1, 2, 4, 8} <= {c["SPLITS"] for c in short} and any(c.get("FUSED_MERGE") for c in short)
    for c in short:
        assert 256 / c["SPLITS"] >= c["BLOCK_N"] or c["SPLITS"] == 1


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("B,S", [(1, 8192), (128, 2048), (8, 32768)])
def test_candidate_configs_sweep_fused_merge(paged, B, S):
    """The table's pick keeps the merge kernel (the fused merge measured no faster); the sweep has the pick, its
    fused variant, and a fused twin of every split config; config strings say which merge runs."""
    chosen = da.select_config(B, 8, 32, S, 128, 132, paged=paged)
    assert "FUSED_MERGE" not in chosen
    cands = da.candidate_configs(B, 8, 32, S, 128, 132, paged=paged)
    assert cands[0] == chosen
    if chosen["SPLITS"] > 1:
        assert cands[1] == da.fused(chosen)
        assert da.config_string(chosen).endswith("merge=kernel")
        assert da.config_string(da.fused(chosen)).endswith("merge=fused")
    else:
        assert "merge" not in da.config_string(chosen)
    plain = [c for c in cands if not c.get("FUSED_MERGE")]
    assert len(plain) == len({da.config_string(c) for c in plain})
    fused_ones = [c for c in cands if c.get("FUSED_MERGE")]
    assert fused_ones == [da.fused(c) for c in plain if c["SPLITS"] > 1]
    if chosen["SPLITS"] > 1:
        assert fused_ones


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch grid, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("paged", [False, True])
def test_one_split_is_one_launch(monkeypatch, paged):
    """SPLITS == 1 writes the output from the attention kernel itself; only SPLITS > 1 launches the merge,
    and not with FUSED_MERGE (the last split merges)."""
    spy = _LaunchSpy(da._merge_splits_kernel)
    monkeypatch.setattr(da, "_merge_splits_kernel", spy)
    lens = [37, 20]
    q, k, v = rand_case(2, 4, 2, 1, max(lens), 16, torch.float32)
    for splits, fused, merges in ((1, False, 0), (3, False, 1), (3, True, 0)):
        spy.grids.clear()
        cfg = small_config(splits=splits, fused=fused)
        if paged:
            check_paged(q, k, v, lens, 8, cfg, torch.float32)
        else:
            lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
            got = da.decode_attention(q, k, v, lens_t, config=cfg, out=poisoned_out(q))
            assert_close(got, da.decode_attention_ref(q.double(), k.double(), v.double(), lens_t), dtype=torch.float32)
        assert len(spy.grids) == merges


# ---------------------------------------------------------------------------------------------------------------
# GPU: bf16 and the decode-suite shapes (default configs, splits and the merge on real hardware)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("B,S", [(1, 8192), (4, 3000), (16, 2500), (32, 1025), (64, 2100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sq", [1, 4])
def test_gpu_suite_shapes(B, S, dtype, sq):
    q, k, v = rand_case(B, 32, 8, sq, S, 128, dtype)
    lens = torch.randint(max(1, S // 2), S + 1, (B,), dtype=torch.int32, device=DEVICE)
    lens[0] = S
    ref = da.decode_attention_ref(q.double(), k.double(), v.double(), lens)
    assert_close(da.decode_attention(q, k, v, lens, out=poisoned_out(q)), ref, dtype=dtype)
    kp, vp, table = make_paged(k, v, lens.cpu(), 64)
    got = da.paged_decode_attention(q, kp, vp, table, lens, out=poisoned_out(q))
    assert_close(got, ref, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("block_n,stages,warps", [(32, 3, 4), (64, 3, 4), (64, 4, 4), (128, 2, 8), (128, 3, 4)])
@pytest.mark.parametrize("splits", [1, 32])
def test_gpu_paged_prefetch_pipelined(block_n, stages, warps, splits):
    """The block-table prefetch under Triton's software pipeliner (the interpreter runs no pipeline): 64-token
    pages, tiles inside a page (32, 64) and spanning pages (128), split starts inside pages, ragged lengths."""
    q, k, v = rand_case(2, 32, 8, 1, 8192, 128, torch.bfloat16)
    lens = torch.tensor([8192, 5000 + 37], dtype=torch.int32, device=DEVICE)
    ref = da.decode_attention_ref(q.double(), k.double(), v.double(), lens)
    kp, vp, table = make_paged(k, v, lens.cpu(), 64)
    cfg = {"BLOCK_M": 16, "BLOCK_N": block_n, "SPLITS": splits, "num_warps": warps, "num_stages": stages}
    got = da.paged_decode_attention(q, kp, vp, table, lens, config=cfg, out=poisoned_out(q))
    assert_close(got, ref, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("B,S", [(1, 8192), (4, 3000)])
@pytest.mark.parametrize("sq", [1, 4])
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_fused_merge_suite_shapes(B, S, sq, paged):
    """bf16, the table's tiles and splits with the fused merge (atomics, acq_rel ordering and .cg reads on
    real hardware, many programs arriving concurrently); twice, to exercise the re-armed counters."""
    q, k, v = rand_case(B, 32, 8, sq, S, 128, torch.bfloat16)
    lens = torch.randint(max(1, S // 2), S + 1, (B,), dtype=torch.int32, device=DEVICE)
    lens[0] = S
    ref = da.decode_attention_ref(q.double(), k.double(), v.double(), lens)
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    if paged:
        kp, vp, table = make_paged(k, v, lens.cpu(), 64)
        cfg = da.fused(da.select_config(B, 8, 32, table.shape[1] * 64, 128, sm, sq, paged=True))
        run = lambda: da.paged_decode_attention(q, kp, vp, table, lens, config=cfg, out=poisoned_out(q))  # noqa: E731
    else:
        cfg = da.fused(da.select_config(B, 8, 32, S, 128, sm, sq))
        run = lambda: da.decode_attention(q, k, v, lens, config=cfg, out=poisoned_out(q))  # noqa: E731
    assert cfg["SPLITS"] > 1
    first = run()
    assert_close(first, ref, dtype=torch.bfloat16)
    assert torch.equal(run(), first)  # deterministic merge order, counters re-armed
    assert not counters().any()


@pytest.mark.gpu
def test_gpu_fused_merge_cuda_graph_replay():
    """Captured once, replayed with new queries and lengths: the counters baked into the graph are zero at every
    replay (the last split re-arms them), and every replay's output is right."""
    B, S = 2, 4096
    q, k, v = rand_case(B, 32, 8, 1, S, 128, torch.bfloat16)
    lens = torch.tensor([S, 3000], dtype=torch.int32, device=DEVICE)
    kp, vp, table = make_paged(k, v, [S, S], 64, poison=False)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "SPLITS": 24, "num_warps": 4, "num_stages": 3, "FUSED_MERGE": True}
    out = torch.empty_like(q)
    call = lambda: da.paged_decode_attention(q, kp, vp, table, lens, config=cfg, out=out)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for trial in range(4):
        q.copy_(torch.randn_like(q))
        lens.copy_(torch.tensor([S - 7 * trial, 1 + 999 * trial], dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, da.decode_attention_ref(q.double(), k.double(), v.double(), lens), dtype=torch.bfloat16)
    from kernopt.kernels import workspace  # the counter buffers, shared by the single-pass kernels

    for buf in workspace._BUFFERS.values():
        assert not buf.any()
    del graph



# --------------------------------------------------------------------------------------------------
# decode_attention_append: HF static-cache decode step (rotary on q / k_new, k / v written at the position,
# attention) in one kernel.
# --------------------------------------------------------------------------------------------------
def _append_case(B, hq, hkv, S, D, dtype, cos_batch=1, device=DEVICE):
    q = torch.randn(B, hq, 1, D, dtype=dtype, device=device)
    k_new = torch.randn(B, hkv, 1, D, dtype=dtype, device=device)
    v_new = torch.randn(B, hkv, 1, D, dtype=dtype, device=device)
    ang = torch.rand(cos_batch, 1, 1, D // 2, device=device).repeat(1, 1, 1, 2) * 6.0
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    k_cache = torch.randn(B, hkv, S, D, dtype=dtype, device=device)
    v_cache = torch.randn(B, hkv, S, D, dtype=dtype, device=device)
    return q, k_new, v_new, cos, sin, k_cache, v_cache


def _check_append(case, pos, mask=None, config=None, dtype=torch.float16):
    q, k_new, v_new, cos, sin, k_cache, v_cache = case
    p = torch.tensor([pos], device=q.device)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    want = da.decode_attention_append_ref(q.double(), k_new.double(), v_new.double(), cos.double(), sin.double(),
                                          k_want.double(), v_want.double(), p, mask=mask)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    da.decode_attention_append_ref(q, k_new, v_new, cos, sin, k_ref, v_ref, p, mask=mask)
    out = torch.full_like(q, float("nan"))
    got = da.decode_attention_append(q, k_new, v_new, cos, sin, k_cache, v_cache, p, mask=mask, config=config,
                                     out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_close(got, want, dtype)
    # the written row is the rotated key rounded once (as the reference rounds it); every other row untouched
    for got_cache, ref_cache in ((k_cache, k_ref), (v_cache, v_ref)):
        torch.testing.assert_close(got_cache, ref_cache, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("splits", [1, 3, 4])
def test_append_positions_gqa_splits(dtype, hq, hkv, splits):
    torch.manual_seed(0)
    S = 3 * 16 + 5  # not a multiple of the tile
    for pos in (0, 15, 16, 17, S - 1):  # first slot, either side of a tile / split edge, the last slot
        case = _append_case(2, hq, hkv, S, 32, dtype)
        _check_append(case, pos, config=small_config(16, splits), dtype=dtype)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_append_with_hf_static_mask(kind, cos_batch):
    """HF's static-cache step: the mask hides the unfilled slots (NaN there: never read), the position is visible."""
    torch.manual_seed(1)
    B, S, pos = 2, 40, 22
    case = list(_append_case(B, 8, 2, S, 64, torch.float16, cos_batch=cos_batch))
    case[5][:, :, pos + 1:] = float("nan")
    case[6][:, :, pos + 1:] = float("nan")
    keep = (torch.arange(S, device=DEVICE) <= pos)[None, None, None, :].expand(B, 1, 1, S)
    mask = keep if kind == "bool" else torch.zeros(B, 1, 1, S, device=DEVICE).masked_fill(~keep, float("-inf"))
    for splits in (1, 3):
        c = [t.clone() for t in case]
        _check_append(c, pos, mask=mask, config=small_config(16, splits))


def test_append_default_config_and_position_outside_writes_nothing():
    torch.manual_seed(2)
    case = _append_case(1, 4, 2, 33, 16, torch.float32)
    _check_append(case, 7, dtype=torch.float32)
    q, k_new, v_new, cos, sin, k_cache, v_cache = case
    before = k_cache.clone(), v_cache.clone()
    da.decode_attention_append(q, k_new, v_new, cos, sin, k_cache, v_cache, torch.tensor([33], device=DEVICE))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_append_rejects_bad_inputs():
    case = _append_case(1, 4, 2, 20, 32, torch.float16)
    q, k_new, v_new, cos, sin, k_cache, v_cache = case
    p = torch.tensor([3], device=DEVICE)
    with pytest.raises(ValueError, match="k_new must be"):
        da.decode_attention_append(q, k_new[:, :1], v_new, cos, sin, k_cache, v_cache, p)
    with pytest.raises(ValueError, match="q must be"):
        da.decode_attention_append(q.expand(1, 4, 2, 32), k_new, v_new, cos, sin, k_cache, v_cache, p)
    with pytest.raises(ValueError, match="cos must broadcast"):
        da.decode_attention_append(q, k_new, v_new, cos[..., :16], sin, k_cache, v_cache, p)
    with pytest.raises(ValueError, match="sin must broadcast"):  # two positions' angles: not one step's
        da.decode_attention_append(q, k_new, v_new, cos, sin.expand(1, 1, 2, 32), k_cache, v_cache, p)
    with pytest.raises(ValueError, match="cache_position"):
        da.decode_attention_append(q, k_new, v_new, cos, sin, k_cache, v_cache, p.float())
    with pytest.raises(ValueError, match="one dtype"):
        da.decode_attention_append(q, k_new.float(), v_new, cos, sin, k_cache, v_cache, p)
    c24 = _append_case(1, 4, 2, 20, 24, torch.float16)
    with pytest.raises(ValueError, match="power of two"):
        da.decode_attention_append(*c24, p)


def test_append_custom_op_mutates_the_caches():
    import kernopt.ops  # noqa: F401  (registers torch.ops.kernopt.*)

    torch.manual_seed(3)
    q, k_new, v_new, cos, sin, k_cache, v_cache = _append_case(1, 4, 2, 20, 32, torch.float16)
    p = torch.tensor([5], device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = da.decode_attention_append_ref(q, k_new, v_new, cos, sin, k_ref, v_ref, p, 0.3)
    got = torch.ops.kernopt.decode_attention_append(q, k_new, v_new, cos, sin, k_cache, v_cache, p, 0.3)
    assert_close(got, want, torch.float16)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,S,pos", [(1, 256, 200), (1, 4096, 4095), (4, 1000, 0)])
def test_gpu_append_suite_shapes(dtype, B, S, pos):
    torch.manual_seed(4)
    case = _append_case(B, 32, 8, S, 128, dtype, device="cuda")
    _check_append(case, pos, dtype=dtype)
