"""A tiny Llama (random weights, from a config: no downloads) compiled with backend="kernopt"."""
import pytest
import torch

import kernopt

transformers = pytest.importorskip("transformers")


def tiny_llama(dtype=torch.float32):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def test_explain_lists_matmul_rewrites():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    report = kernopt.explain(model, ids, options={"inner": "eager"})
    swiglu = [r for r in report.rewrites if "swiglu" in r.matched]
    assert len(swiglu) == 2, report  # one fused MLP per layer
    assert all(r.kernel == "kernopt.linear" for r in swiglu)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_greedy_generate_matches_eager(inner):
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
        model.forward = torch.compile(model.forward, backend="kernopt", options={"inner": inner})
        got = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(got, want)
