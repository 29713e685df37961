"""kernopt.optimize on a tiny Llama: arguments, quantized layers, generate runs and matches where it must."""
import pytest
import torch

import kernopt

transformers = pytest.importorskip("transformers")


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_bad_arguments_name_valid_choices():
    with pytest.raises(ValueError, match="valid: None, 'int4', 'fp8'"):
        kernopt.optimize(tiny_llama(), quantize="int8")
    with pytest.raises(ValueError, match="valid: 'paged', 'static'"):
        kernopt.optimize(tiny_llama(), cache="ring")
    with pytest.raises(ValueError, match="valid: 'auto'"):
        kernopt.optimize(tiny_llama(), scenario="batch")


def test_optimize_bf16_paged_generate_matches_eager():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
        kernopt.optimize(model, inner="eager")
        got = model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
        again = model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(got, want)
    assert torch.equal(again, want)  # the paged cache is reset and reused across generate calls


@pytest.mark.parametrize("quantize", ["int4", "fp8"])
def test_optimize_quantized_generates_close_logits(quantize):
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits.double()
        kernopt.optimize(model, quantize=quantize, group_size=32, inner="eager")
        assert "lm_head" not in [n for n, m in model.named_modules() if type(m).__name__.endswith(("Int4Linear", "Fp8Linear"))]
        assert sum(type(m).__name__ in ("Int4Linear", "Fp8Linear") for m in model.modules()) == 14
        out = model(ids).logits.double()
        cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
        print(f"{quantize}: logits cosine similarity to the float model {cos:.5f}")
        assert cos > (0.98 if quantize == "int4" else 0.995)
        gen = model.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    assert gen.shape == (1, 20)


def test_optimize_static_cache_compiles_decode_through_transformers():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
        kernopt.optimize(model, cache="static", inner="eager")
        cc = model.generation_config.compile_config
        assert cc.options["mode"] == "reduce-overhead" and model.generation_config.cache_implementation == "static"
        cc._compile_all_devices = True  # transformers compiles decode steps only on GPUs unless told
        report = kernopt.backend.Report()
        kernopt.backend._active_reports.append(report)
        try:
            got = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
            graphs = report.graphs
            again = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
        finally:
            kernopt.backend._active_reports.remove(report)
    assert torch.equal(got, want) and torch.equal(again, want)
    assert graphs >= 1  # decode steps went through the kernopt backend
    assert report.graphs == graphs  # and a second generate call reuses them (no backend-match recompiles)
