"""kernopt.optimize on a tiny Llama: arguments, quantized layers, generate runs and matches where it must."""
import contextlib

import pytest
import torch

import kernopt

transformers = pytest.importorskip("transformers")


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@contextlib.contextmanager
def listening_report():
    """A backend Report that records every graph compiled inside the block (what explain() listens with)."""
    report = kernopt.backend.Report()
    kernopt.backend._active_reports.append(report)
    try:
        yield report
    finally:
        kernopt.backend._active_reports.remove(report)


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
        with listening_report() as report:
            got = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
            graphs = report.graphs
            again = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(got, want) and torch.equal(again, want)
    assert graphs >= 1  # decode steps went through the kernopt backend
    assert report.graphs == graphs  # and a second generate call reuses them (no backend-match recompiles)


def test_optimize_static_cache_compiles_the_prompt_forward_too(monkeypatch):
    """With KERNOPT_COMPILE_PREFILL=1, on the devices in PREFILL_COMPILE_DEVICES (the GPU; here CPU, switched on),
    eager calls of the forward (transformers' prompt forward under a static cache) run a kernopt-compiled
    forward; the decode step, compiled by transformers, traces the eager forward (never the prompt's compiled
    one: on the GPU that ran decode without CUDA graphs); same tokens; a second call compiles nothing;
    plain_torch_eager runs the eager forward."""
    from kernopt.hf import plain_torch_eager

    monkeypatch.setattr(kernopt.hf, "PREFILL_COMPILE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setenv("KERNOPT_COMPILE_PREFILL", "1")
    monkeypatch.setenv("KERNOPT_PREFILL_CUDA_GRAPHS", "0")  # the graphed prompt: the next test
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
        eager_logits = model(ids).logits
        eager_forward = model.forward
        kernopt.optimize(model, cache="static", inner="eager")
        assert model.forward != eager_forward and model._kernopt_eager_forward == eager_forward
        model.generation_config.compile_config._compile_all_devices = True
        prompt_calls = []
        compiled = model._kernopt_prompt_forward
        model._kernopt_prompt_forward = lambda *a, **k: prompt_calls.append(1) or compiled(*a, **k)
        with listening_report() as report:
            prompt_logits = model(ids).logits
            prompt_graphs = report.graphs
            got = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
            graphs, calls = report.graphs, len(prompt_calls)
            again = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
            with plain_torch_eager(model):
                assert model.forward == eager_forward
                plain = model(ids).logits
            assert model.forward != eager_forward  # dispatching again after the block
            plain_graphs = report.graphs
    assert prompt_graphs >= 1  # the prompt's forward went through the kernopt backend
    assert graphs > prompt_graphs  # and so did the decode step, through transformers' compiled call
    # one prompt forward per call (model(ids), then generate's prompt): the 5 decode steps never entered it
    assert calls == 2 and len(prompt_calls) == 3, prompt_calls
    assert report.graphs == graphs == plain_graphs  # nothing recompiled; the plain forward compiled nothing
    assert torch.equal(got, want) and torch.equal(again, want)
    torch.testing.assert_close(prompt_logits, eager_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain, eager_logits, rtol=0, atol=0)
    monkeypatch.delenv("KERNOPT_COMPILE_PREFILL")
    assert kernopt.hf.compile_prefill_enabled()  # on by default (on the devices in PREFILL_COMPILE_DEVICES)
    monkeypatch.setenv("KERNOPT_COMPILE_PREFILL", "0")  # switched off: the forward is left alone
    other = tiny_llama()
    forward = other.forward
    kernopt.optimize(other, cache="static", inner="eager")
    assert other.forward == forward


def test_compiled_prompt_forward_leaves_static_cache_tensors_marked_static(monkeypatch):
    """transformers marks a static cache's tensors as fixed-address (mark_static_address) when they are
    allocated, except while Dynamo traces; with the prompt forward compiled they are allocated inside the trace,
    and the decode step's CUDA graphs (GPU) then skipped for mutated non-static inputs. The dispatching forward
    marks them after the compiled call."""
    from transformers import StaticCache

    monkeypatch.setattr(kernopt.hf, "PREFILL_COMPILE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setenv("KERNOPT_COMPILE_PREFILL", "1")
    monkeypatch.setenv("KERNOPT_PREFILL_CUDA_GRAPHS", "0")
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    kernopt.optimize(model, cache="static", inner="eager")
    # a cache the model cannot initialize ahead (otherwise _static_cache_ready does, before the compiled call)
    monkeypatch.setattr(model, "_get_static_cache_init_shape", lambda: None)
    cache = StaticCache(config=model.config, max_cache_len=16)
    allocated_in_trace = []
    compiled = model._kernopt_prompt_forward

    def prompt_forward(*a, **k):
        out = compiled(*a, **k)
        allocated_in_trace.extend(not hasattr(layer.keys, "_dynamo_static_input_type") for layer in cache.layers)
        return out

    model._kernopt_prompt_forward = prompt_forward
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert allocated_in_trace and all(allocated_in_trace)  # the situation the marking is for
    for layer in cache.layers:
        for name in ("keys", "values", "cumulative_length"):
            assert hasattr(getattr(layer, name), "_dynamo_static_input_type"), name


def test_static_cache_is_reused_across_generate_calls_of_one_shape():
    """transformers 5 builds a new static cache per generate call; optimize(cache="static") hands back the same
    one (reset) while batch size and length stay, so CUDA graphs that read it keep their addresses; a longer
    call gets a new, longer cache, which shorter calls then reuse (transformers' own sizing); tokens unchanged."""
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), return_dict_in_generate=True)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, **kw).sequences
        want_long = model.generate(ids, max_new_tokens=9, **kw).sequences
        kernopt.optimize(model, cache="static", inner="eager", compile=False)
        first = model.generate(ids, max_new_tokens=6, **kw)
        second = model.generate(ids, max_new_tokens=6, **kw)
        longer = model.generate(ids, max_new_tokens=9, **kw)
        shorter = model.generate(ids, max_new_tokens=6, **kw)
        other_batch = model.generate(ids[:1], max_new_tokens=6, do_sample=False,
                                     attention_mask=torch.ones_like(ids[:1]), return_dict_in_generate=True)
    assert second.past_key_values is first.past_key_values
    assert longer.past_key_values is not first.past_key_values
    assert shorter.past_key_values is longer.past_key_values
    assert other_batch.past_key_values is not longer.past_key_values
    for got in (first, second, shorter):
        assert torch.equal(got.sequences, want)
    assert torch.equal(longer.sequences, want_long)
    assert torch.equal(other_batch.sequences, want[:1])


def test_prompt_forward_against_a_static_cache_runs_graphed(monkeypatch):
    """With a static cache (generate's under cache="static"), the prompt forward runs the compiled function that
    replays CUDA graphs on a GPU (mode="reduce-overhead"; on CPU Inductor would skip the graphs, and the eager inner
    compiler has none): the cache is initialized and its tensors marked fixed-address before that call (a cache
    allocated inside a captured forward would live in the graphs' pool), the outputs are copies, the tokens are
    the eager ones and a second generate compiles nothing. Without a static cache, or a model whose cache cannot
    be initialized ahead, or KERNOPT_PREFILL_CUDA_GRAPHS=0, the forward compiled without graphs runs."""
    monkeypatch.setattr(kernopt.hf, "PREFILL_COMPILE_DEVICES", ("cuda", "cpu"))
    monkeypatch.delenv("KERNOPT_PREFILL_CUDA_GRAPHS", raising=False)
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
        eager_logits = model(ids).logits
        kernopt.optimize(model, cache="static", inner="eager")
        model.generation_config.compile_config._compile_all_devices = True
        graphed, plain = model._kernopt_prompt_graphed, model._kernopt_prompt_forward
        assert graphed is not None
        seen, returned, plain_calls = [], [], []

        def spy(*a, **k):
            cache = k["past_key_values"]
            seen.append(all(layer.is_initialized and hasattr(layer.keys, "_dynamo_static_input_type")
                            and hasattr(layer.values, "_dynamo_static_input_type") for layer in cache.layers))
            out = graphed(*a, **k)
            returned.append(out.logits)
            return out

        model._kernopt_prompt_graphed = spy
        model._kernopt_prompt_forward = lambda *a, **k: plain_calls.append(1) or plain(*a, **k)
        with listening_report() as report:
            got = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
            graphs = report.graphs
            again = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
            assert report.graphs == graphs  # the second call compiled nothing
            out = model(ids)  # no cache passed: the forward compiled without graphs
    assert seen == [True, True] and len(plain_calls) == 1
    assert torch.equal(got, want) and torch.equal(again, want)
    torch.testing.assert_close(out.logits, eager_logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the returned logits are copies of the graphed call's
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=16)
        res = model(ids, past_key_values=cache, use_cache=True)
    assert seen[-1] and res.logits.data_ptr() != returned[-1].data_ptr()
    torch.testing.assert_close(res.logits, eager_logits, rtol=1e-4, atol=1e-4)
    # a model that cannot say its cache's shape (transformers' answer None, e.g. MLA): no graphs, nothing allocated
    monkeypatch.setattr(model, "_get_static_cache_init_shape", lambda: None)
    cache = StaticCache(config=model.config, max_cache_len=16)
    plain_calls.clear()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert len(plain_calls) == 1 and len(seen) == 3
    monkeypatch.setenv("KERNOPT_PREFILL_CUDA_GRAPHS", "0")
    other = tiny_llama()
    kernopt.optimize(other, cache="static", inner="eager")
    assert other._kernopt_prompt_graphed is None and not kernopt.hf.prefill_cuda_graphs_enabled()


class _HostEvent:
    """CPU has no events, and its ops are synchronous: recording / waiting is a no-op there."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass


@pytest.mark.parametrize("cache", ["paged", "static"])
def test_deferred_stop_check_returns_the_synchronous_tokens(cache, monkeypatch):
    """optimize()'s generate reads "all finished?" one step late (transformers' DeferredStopCheck, as on mps);
    early EOS stops, padding of finished rows and the undone extra step give exactly the synchronous tokens."""
    from transformers.generation import utils as gen_utils

    model = tiny_llama()
    original_check = gen_utils.DeferredStopCheck.__dict__["is_supported"]
    prompts = {1: torch.randint(0, 97, (1, 7)), 3: torch.randint(0, 97, (3, 7))}
    with torch.no_grad():
        want = {}
        for bs, ids in prompts.items():
            free = model.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
            eos = int(free[0, 7 + 3])  # sequence 0 stops after 4 new tokens; the others when they meet it
            kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
            want[bs] = (kw, model.generate(ids, attention_mask=torch.ones_like(ids), **kw))
        assert want[1][1].shape[1] == 7 + 4  # the synchronous loop stopped early: the case the undo is for
        kernopt.optimize(model, cache=cache, inner="eager")
        if cache == "static":
            model.generation_config.compile_config._compile_all_devices = True
        monkeypatch.setattr(kernopt.hf, "DEFER_STOP_CHECK_DEVICES", ("cuda", "cpu"))
        monkeypatch.setattr(torch, "Event", _HostEvent)
        undone = []
        finish = gen_utils.DeferredStopCheck.finish
        monkeypatch.setattr(gen_utils.DeferredStopCheck, "finish",
                            lambda self: undone.append(finish(self)) or undone[-1])
        for bs, ids in prompts.items():
            kw, expected = want[bs]
            got = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            assert torch.equal(got, expected), (bs, got, expected)
    assert len(undone) == 2 and undone[0] == 1  # deferred in both calls; bs1's EOS step was seen late, undone
    assert gen_utils.DeferredStopCheck.__dict__["is_supported"] is original_check  # restored after generate


@pytest.mark.parametrize("quantize,op", [("int4", "kernopt.int4_linear"), ("fp8", "kernopt.fp8_linear")])
def test_optimized_quantized_linears_run_their_ops_in_eager_calls(quantize, op, monkeypatch):
    """After optimize(), an eager forward (transformers' prefill under cache="static") dispatches the fused op
    wherever that op runs a kernel (the GPU; here the interpreter, switched on for the test); plain_torch_eager
    and an un-optimized module keep the plain-torch reference; both agree."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kernopt import ops
    from kernopt.hf import plain_torch_eager

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    def eager(model, ids):
        with Seen() as seen, torch.no_grad():
            return model(ids).logits.double(), seen.ops

    model = tiny_llama().half() if quantize == "int4" else tiny_llama()
    monkeypatch.setattr(ops, "EAGER_KERNEL_IMPLS", ("triton", "interpreter"))
    monkeypatch.delenv("KERNOPT_CPU")  # this test runs the ops' kernels (in the interpreter where it is on)
    ids = torch.randint(0, 97, (1, 7))
    kernopt.optimize(model, quantize=quantize, group_size=32, cache="static", inner="eager")
    switched = [m for m in model.modules() if getattr(m, "kernel_in_eager", False)]
    assert len(switched) == 14
    with plain_torch_eager(model):
        ref, ref_ops = eager(model, ids)
    assert op not in ref_ops and all(m.kernel_in_eager for m in switched)  # restored on exit
    if ops.implementation(ids.new_empty(0, dtype=model.dtype)) != "interpreter":
        pytest.skip("no Triton interpreter here: the op would run its reference anyway")
    out, out_ops = eager(model, ids)
    assert op in out_ops
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    switched[0].kernel_in_eager = False  # a module optimize() did not switch: the reference
    monkeypatch.setattr(ops, "EAGER_KERNEL_IMPLS", ("triton",))  # and on CPU, without the test's switch
    assert op not in eager(model, ids)[1]


def test_optimize_int4_swiglu_generates_the_unfused_tokens(monkeypatch):
    """KERNOPT_INT4_SWIGLU=1: each layer's silu(gate) * up becomes kernopt.int4_swiglu (in the one-row GEMV's
    epilogue at decode); greedy tokens with a static cache (decode steps through the backend) are those of the same
    model quantized without kernopt."""
    from kernopt.int4 import quantize_int4_

    monkeypatch.setenv("KERNOPT_INT4_SWIGLU", "1")
    ref = quantize_int4_(tiny_llama(), group_size=32)
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
        kernopt.optimize(model, quantize="int4", group_size=32, cache="static", inner="eager")
        model.generation_config.compile_config._compile_all_devices = True
        with listening_report() as report:
            got = model.generate(ids, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(got, want)
    fused = [r for r in report.rewrites if r.pass_name == "int4_swiglu"]
    assert len(fused) >= 2 and all(r.kernel == "kernopt.int4_swiglu" for r in fused), report.table()
    assert any("M=1 " in r.matched for r in fused), report.table()  # the decode step's


def test_optimize_decode_append_generates_eager_tokens(monkeypatch):
    """KERNOPT_DECODE_APPEND=1: each layer's decode step (rotary, the static cache's index_copy_ of k / v, the
    attention) becomes one kernopt.decode_attention_append, which Inductor runs on the cache itself; greedy tokens
    are eager's, and the cache the call returns holds eager's keys and values (within fp16 rounding: the compiled
    projections and the rotary round differently)."""
    from kernopt import ops
    from kernopt.tolerance import assert_close

    monkeypatch.setenv("KERNOPT_DECODE_APPEND", "1")
    monkeypatch.delenv("KERNOPT_CPU")  # the attention pass rewrites only where kernels run: here the interpreter
    ref = tiny_llama().half()  # fp16: the attention kernels' dtype under the interpreter
    model = tiny_llama().half()
    if ops.implementation(torch.empty(0, dtype=torch.float16)) == "reference":
        pytest.skip("no Triton interpreter here: the attention pass would leave the step alone")
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids),
                            cache_implementation="static", return_dict_in_generate=True)
        kernopt.optimize(model, cache="static", inner="inductor")
        model.generation_config.compile_config._compile_all_devices = True
        with listening_report() as report:
            got = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids),
                                 return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    fused = [r for r in report.rewrites if r.pass_name == "decode_append"]
    assert len(fused) == 2 and all(r.kernel == "kernopt.decode_attention_append" for r in fused), report.table()
    n = ids.shape[1] + 5  # positions written: the prompt's, then one per decode step but the last token's
    for layer_got, layer_want in zip(got.past_key_values.layers, want.past_key_values.layers):
        for got_t, want_t in ((layer_got.keys, layer_want.keys), (layer_got.values, layer_want.values)):
            assert_close(got_t[:, :, :n], want_t[:, :, :n].double(), torch.float16)


# (quantize, its switch, its reference quantizer's kwargs, its buffers, its grouped pass, the logits' tolerance)
GROUPED = {"int4": ("KERNOPT_INT4_GROUP", {"group_size": 32}, ("qweight", "scales"), "int4_group", 0.0),
           "fp8": ("KERNOPT_FP8_GROUP", {}, ("weight", "weight_scale"), "fp8_group", 2e-2)}


@pytest.mark.parametrize("grouping", ["1", "0"])
@pytest.mark.parametrize("quantize", ["int4", "fp8"])
def test_optimize_packs_linears_sharing_an_input_and_groups_them(quantize, grouping, monkeypatch):
    """optimize(quantize=...) traces which linears read one input (q/k/v, gate/up), lays each set out in shared
    buffers (kernopt.int4.pack_adjacent / kernopt.fp8.pack_adjacent), and the pass runs each set as one grouped
    op; the logits are those of the same model quantized without any of it (fp8: to fp32 summation order, since
    the grouped launch's tile may differ and a code that moves by one e4m3 step carries on). The switch
    (KERNOPT_INT4_GROUP / KERNOPT_FP8_GROUP = 0) turns both off."""
    from kernopt import ops
    from kernopt.fp8 import quantize_fp8_
    from kernopt.int4 import quantize_int4_
    from kernopt.tolerance import assert_close

    env, kwargs, buffers, pass_name, rel = GROUPED[quantize]
    monkeypatch.setenv(env, grouping)
    ref = (quantize_int4_ if quantize == "int4" else quantize_fp8_)(tiny_llama(), **kwargs)
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        want = ref(ids).logits
        kernopt.optimize(model, quantize=quantize, inner="eager", **kwargs)
        with listening_report() as report:
            got = model(ids).logits
    assert not torch.isnan(got).any()
    if rel:
        torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))
    else:
        assert_close(got, want.double(), torch.float32, scale=2.0)
    groups = model._kernopt[f"{quantize}_groups"]
    grouped = [r for r in report.rewrites if r.pass_name == pass_name]
    if grouping == "0":
        assert groups == [] and grouped == []
        return
    assert groups == [names for i in range(2) for names in (
        [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"], [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")])]
    for names in groups:
        mods = [model.get_submodule(n) for n in names]
        for attr in buffers:
            parts = [getattr(m, attr) for m in mods]
            assert len({p.untyped_storage().data_ptr() for p in parts}) == 1
            assert ops.adjacent_view(parts) is not None
    assert sorted(r.matched.split(" ")[0] for r in grouped) == ["2", "2", "3", "3"], report.table()
    if quantize == "fp8":
        assert all(r.config.startswith("one launch ") for r in grouped if r.implementation != "reference"), \
            report.table()


def test_static_cache_prompt_with_padding_takes_the_bounded_mask(monkeypatch):
    """generate's compiled prompt under a static cache: its mask depends on inputs (cache_position, the padding),
    so it stays a mask, and flash_attention walks it with BOUNDS (kernels/flash_attention.py); the left-padded
    batch still gives eager's tokens."""
    import kernopt.hf  # noqa: F401  (loaded lazily)
    import kernopt.kernels.flash_attention as fa

    launches = []
    kernel = fa._flash_attention_fwd

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(fa, "_flash_attention_fwd", Spy())
    monkeypatch.delenv("KERNOPT_CPU")  # the kernels under the interpreter here, not this directory's references
    monkeypatch.setattr(kernopt.hf, "PREFILL_COMPILE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setenv("KERNOPT_COMPILE_PREFILL", "1")
    monkeypatch.setenv("KERNOPT_PREFILL_CUDA_GRAPHS", "0")
    model = tiny_llama()
    ids = torch.randint(1, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        want_logits = model(ids, attention_mask=mask).logits
        kernopt.optimize(model, cache="static", inner="eager")
        model.generation_config.compile_config._compile_all_devices = True
        got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        launched = len(launches)
        logits = model(ids, attention_mask=mask).logits  # the compiled prompt forward, no cache: the same mask form
    assert torch.equal(got, want)
    assert any(kw.get("BOUNDS") for kw in launches[:launched]), [kw.get("BOUNDS") for kw in launches]
    assert any(kw.get("BOUNDS") for kw in launches[launched:]), [kw.get("BOUNDS") for kw in launches]
    # the real positions (padding rows are HF's garbage either way)
    torch.testing.assert_close(logits[1], want_logits[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[0, 4:], want_logits[0, 4:], rtol=1e-4, atol=1e-4)
