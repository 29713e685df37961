"""HF generate with kernopt attention and the paged KV cache gives eager's greedy tokens (tiny Llama, fp32).

tests/hf/conftest.py runs whole models on the ops' references (KERNOPT_CPU=reference) to stay fast; the paged
reference gathers the cache's pages itself, so those tests check the cache and the routing.
`test_generate_runs_the_triton_kernels` lifts that for one generate call: there the Triton kernels run under
the interpreter (prefill: flash_attention, decode: paged_decode_attention), and it checks they were called.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kernopt import hf_attention  # noqa: E402
from kernopt.paged_cache import PagedKVCache, paged_cache_waste, static_cache_waste  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_llama(kv_heads=2):
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=kv_heads, head_dim=16,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(DEVICE).eval()
    # Larger-than-default init so attention is far from uniform and a wrong key changes the argmax.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if p.dim() == 2 else 1.0)
    return model


def prompts(lengths, vocab=97):
    """Left-padded batch (HF's convention for decoder-only generation)."""
    g = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(2, vocab, (n,), generator=g)
        mask[b, width - n:] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


def greedy(model, ids, mask, new_tokens, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              min_new_tokens=new_tokens, **kw)


@pytest.fixture(scope="module")
def models():
    eager = tiny_llama()
    ours = copy.deepcopy(eager)
    hf_attention.install(ours)
    assert ours.config._attn_implementation == "kernopt"
    return eager, ours


@pytest.mark.parametrize("lengths", [[11], [5, 13, 9]])
def test_paged_generate_matches_eager(models, lengths):
    eager, ours = models
    ids, mask = prompts(lengths)
    new = 12
    expected = greedy(eager, ids, mask, new)
    cache = hf_attention.paged_cache(ours, page_size=8)  # 8-token pages: sequences cross pages while decoding
    got = greedy(ours, ids, mask, new, **{hf_attention.cache_argument(ours): cache})
    assert torch.equal(got, expected), f"\n{got}\n{expected}"
    # Padding is not stored: each sequence holds exactly its own tokens (prompt + new - the last one, whose
    # K/V generate never computes).
    assert cache.lens == [n + new - 1 for n in lengths]
    assert cache.get_seq_length() == ids.shape[1] + new - 1
    assert cache.memory_waste() < 8 / min(cache.lens) + 1e-9


def test_generate_runs_the_triton_kernels(models, monkeypatch):
    from kernopt.kernels import decode_attention as da

    monkeypatch.delenv("KERNOPT_CPU", raising=False)
    calls = []
    real = da.paged_decode_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(da, "paged_decode_attention", spy)
    eager, ours = models
    ids, mask = prompts([3, 9])
    new = 7
    expected = greedy(eager, ids, mask, new)
    cache = hf_attention.paged_cache(ours, page_size=4)
    got = greedy(ours, ids, mask, new, **{hf_attention.cache_argument(ours): cache})
    assert torch.equal(got, expected), f"\n{got}\n{expected}"
    layers = ours.config.num_hidden_layers
    assert len(calls) == layers * (new - 1)  # every decode step of every layer ran the kernel


def test_cache_reuse_across_generate_calls(models):
    eager, ours = models
    cache = hf_attention.paged_cache(ours, page_size=8)
    kw = {hf_attention.cache_argument(ours): cache}
    ids, mask = prompts([7, 15])
    greedy(ours, ids, mask, 6, **kw)
    pool_pages = cache.num_pages
    assert len(cache.free_pages) < pool_pages
    cache.reset()  # frees every page; the pools stay for the next call
    assert len(cache.free_pages) == pool_pages and cache.get_seq_length() == 0
    ids, mask = prompts([9, 4, 12])
    got = greedy(ours, ids, mask, 8, **kw)
    assert torch.equal(got, greedy(eager, ids, mask, 8))
    assert cache.num_pages == pool_pages or cache.num_pages >= sum(cache.lens) // 8


def test_contiguous_cache_path(models):
    """Without a paged cache, kernopt attention runs on HF's dynamic cache (decode_attention kernel)."""
    eager, ours = models
    ids, mask = prompts([10])
    assert torch.equal(greedy(ours, ids, mask, 8), greedy(eager, ids, mask, 8))


def test_continuing_with_a_long_chunk(models):
    """A second forward of > 8 tokens on a filled paged cache gathers pages (chunked prefill)."""
    eager, ours = models
    ids, mask = prompts([6, 14])
    more = torch.randint(2, 97, (2, 10), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    full_ids = torch.cat([ids, more], 1)
    full_mask = torch.cat([mask, torch.ones_like(more)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)  # positions as generate makes them (padding-aware)
    with torch.no_grad():
        expected = eager(input_ids=full_ids, attention_mask=full_mask, position_ids=pos).logits[:, -10:]
        cache = hf_attention.paged_cache(ours, page_size=4)
        key = hf_attention.cache_argument(ours)
        ours(input_ids=ids, attention_mask=mask, position_ids=pos[:, : ids.shape[1]], **{key: cache},
             use_cache=True)
        got = ours(input_ids=more, attention_mask=full_mask, position_ids=pos[:, -10:], **{key: cache},
                   use_cache=True).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_install_uninstall(models):
    model = tiny_llama()
    hf_attention.install(model)
    assert model.config._attn_implementation == "kernopt"
    hf_attention.uninstall(model)
    assert model.config._attn_implementation == "eager"


def test_paged_cache_rejects_eager_attention():
    model = tiny_llama()
    ids, mask = prompts([5])
    cache = PagedKVCache(model.config, page_size=8)
    with pytest.raises((RuntimeError, ValueError)):
        greedy(model, ids, mask, 3, **{hf_attention.cache_argument(model): cache})


def test_memory_waste_mixed_lengths():
    """Lengths spread 64..4096: the paged cache reserves < 4% unused; a static cache about half."""
    lengths = torch.linspace(64, 4096, 24).round().long().tolist()
    cache = PagedKVCache(num_layers=1, page_size=64)
    width = max(lengths)
    k = torch.zeros(len(lengths), 1, width, 2)
    valid = torch.arange(width)[None, :] >= (width - torch.tensor(lengths))[:, None]
    cache.append(0, k, k, valid)
    for _ in range(3):  # a few decode steps
        cache.append(0, k[:, :, :1], k[:, :, :1])
    final = [n + 3 for n in lengths]
    assert cache.lens == final
    waste = cache.memory_waste()
    assert waste == pytest.approx(paged_cache_waste(final, 64))
    assert waste < 0.04
    assert static_cache_waste(final, width + 3) > 0.4
    report = cache.memory_report()
    assert report["tokens"] == sum(final) and report["slots_held"] >= sum(final)
    # freeing a sequence returns its pages
    before = len(cache.free_pages)
    cache.free(0)
    assert len(cache.free_pages) == before + (final[0] + 63) // 64 and cache.lens[0] == 0


def test_paged_cache_contents_match_tokens():
    """append() places each real token at its page slot (checked through the block table)."""
    torch.manual_seed(0)
    cache = PagedKVCache(num_layers=2, page_size=4)
    k = torch.randn(2, 3, 6, 5)
    v = torch.randn(2, 3, 6, 5)
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    for layer in range(2):
        cache.append(layer, k + layer, v - layer, valid)
    k2, v2 = torch.randn(2, 3, 1, 5), torch.randn(2, 3, 1, 5)
    for layer in range(2):
        cache.append(layer, k2, v2)
    kp, vp, table, lens = cache.view(1)
    assert lens.tolist() == [5, 7]
    for b, real in enumerate([k[0, :, 2:] + 1, k[1] + 1]):
        seq = torch.cat([real, k2[b]], 1)  # [H, L, D]
        for j in range(seq.shape[1]):
            torch.testing.assert_close(kp[table[b, j // 4], j % 4], seq[:, j])


def test_crop_follows_transformers_meaning(models):
    """crop(-n) removes n tokens (the deferred stop check's undo), crop(n > 0) keeps n (legacy), crop(0) keeps all;
    a forward after a crop attends to exactly the kept tokens."""
    eager, ours = models
    cache = hf_attention.paged_cache(ours, page_size=4)
    kw = {hf_attention.cache_argument(ours): cache}
    ids, mask = prompts([7, 7])  # no padding: positions are the same however the sequence is fed
    out = greedy(ours, ids, mask, 5, **kw)
    total = cache.get_seq_length()
    lens = list(cache.lens)
    cache.crop(0)
    assert cache.get_seq_length() == total and list(cache.lens) == lens
    cache.crop(-2)
    assert cache.get_seq_length() == total - 2 and list(cache.lens) == [n - 2 for n in lens]
    cache.crop(total - 3)  # legacy: the length to keep
    assert cache.get_seq_length() == total - 3 and list(cache.lens) == [n - 3 for n in lens]
    assert len(cache.free_pages) + sum(len(p) for p in cache.seq_pages) == cache.num_pages
    with torch.no_grad():
        step = ours(input_ids=out[:, total - 3: total - 2], attention_mask=torch.ones_like(out[:, : total - 2]),
                    past_key_values=cache, use_cache=True).logits[:, -1]
        ref = eager(input_ids=out[:, : total - 2]).logits[:, -1]
    torch.testing.assert_close(step, ref, atol=1e-4, rtol=1e-4)
