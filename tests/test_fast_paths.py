"""Every fast path against the plain path it replaces, on tiny random models (float32, tolerance 1e-5); unpadding
has its own file, test_packing.py:

- the masked-LM loss over the scored tokens only (scored_token_logits);
- the opt-in compiled decoding (enable_compiled_decoding: static cache, torch.compile'd decoding step), of float32
  and of int8 models.

The plain path is computing the loss from the full logits, or leaving the mode off.

Generated tokens must be identical (that is what the fast paths promise); the models that generate have large
weights (initializer_range=0.2) so that their logits are far from ties. A copied, pickled or reloaded model
has the original's weights exactly and its outputs to 1e-5: MKL's fp32 GEMM does not promise identical
rounding for separately allocated copies of the same weights on every CPU.
"""

import copy
import inspect
import io
import logging

import pytest
import torch
from batch_helpers import TOLERANCE, build, padded_batch
from torch._dynamo.testing import CompileCounter
from transformers import GenerationConfig, StaticCache
from transformers.cache_utils import StaticLayer

import modeling_selfattn.fast_paths as fast_paths
import modeling_selfattn.kernels as kernels
import modeling_selfattn.quantization as quantization
from modeling_selfattn import (
    SelfAttnForCausalLM,
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
)
from modeling_selfattn.fast_paths import enable_compiled_decoding
from modeling_selfattn.kernels import ONEDNN_AVAILABLE, set_linear_kernel
from modeling_selfattn.quantization import int8_linear


def test_masked_lm_loss_and_gradients_match_the_full_cross_entropy():
    model = build(SelfAttnForMaskedLM).train()
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, 99, (3, 11), generator=generator)
    labels = input_ids.masked_fill(torch.rand(input_ids.shape, generator=generator) > 0.3, -100)

    output = model(input_ids, labels=labels)
    output.loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    assert output.logits.shape == (3, 11, 99) and output.logits.requires_grad  # whole and differentiable

    model.zero_grad(set_to_none=True)
    logits = model(input_ids).logits
    full_loss = torch.nn.functional.cross_entropy(logits.view(-1, 99), labels.view(-1))
    full_loss.backward()
    assert abs(output.loss.item() - full_loss.item()) <= TOLERANCE
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(gradients[name], parameter.grad, rtol=0, atol=TOLERANCE, msg=name)

    # num_items_in_batch (Trainer's gradient accumulation) divides the summed loss the same way
    summed = model(input_ids, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 99), labels.view(-1), reduction="sum") / 7
    assert abs(summed.item() - expected.item()) <= TOLERANCE


# --- compiled decoding ------------------------------------------------------------------------------------------


def compiled_steps_ran(model) -> bool:
    forward = model.__dict__.get("forward")
    return isinstance(forward, fast_paths.CompiledDecodingForward) and forward.compiled_step is not None


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
@pytest.mark.parametrize(
    "model_class, shape",
    [(SelfAttnForConditionalGeneration, "encoder_decoder"), (SelfAttnForCausalLM, "decoder")],
)
def test_compiled_decoding_generates_the_same_tokens(model_class, shape, num_beams):
    torch._dynamo.reset()
    model = build(model_class, shape, tie_word_embeddings=False, initializer_range=0.2, type_vocab_size=0)
    batch = padded_batch(lengths=(8, 5, 3), padding_side="right" if shape == "encoder_decoder" else "left")
    # A GenerationConfig of the caller's own leaves the cache and compile settings to the model's.
    generation_config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, num_beams=num_beams, do_sample=False)
    expected = model.generate(**batch, generation_config=generation_config)
    fast = enable_compiled_decoding(copy.deepcopy(model))
    assert fast.generation_config.cache_implementation == "static"
    assert torch.equal(fast.generate(**batch, generation_config=generation_config), expected)
    assert compiled_steps_ran(fast)  # the decoding steps did run compiled
    assert torch.equal(fast.generate(**batch, generation_config=generation_config), expected)  # and again
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    # Copies, pickled or not, compile their own steps rather than calling the original's.
    for other in (copy.deepcopy(fast), torch.load(buffer, weights_only=False)):
        assert not compiled_steps_ran(other) and other.forward.model is other
        assert torch.equal(other.generate(**batch, generation_config=generation_config), expected)
        assert compiled_steps_ran(other)
    enable_compiled_decoding(fast, False)
    assert fast.generation_config.cache_implementation is None and "forward" not in fast.__dict__
    assert torch.equal(fast.generate(**batch, generation_config=generation_config), expected)


@pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="oneDNN runs on x86 CPUs with a oneDNN build of torch only")
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_compiled_decoding_runs_the_onednn_kernel_inside_the_compiled_steps(num_beams):
    torch._dynamo.reset()
    model = build(
        SelfAttnForConditionalGeneration, "encoder_decoder", tie_word_embeddings=False, initializer_range=0.2,
        type_vocab_size=0,
    )
    # Eight sequences: a decoding step has enough rows (tokens) for the linears to take oneDNN's path.
    batch = padded_batch(lengths=(8, 5, 3, 8, 2, 6, 7, 4))
    generation_config = GenerationConfig(max_new_tokens=5, min_new_tokens=5, num_beams=num_beams, do_sample=False)
    expected = model.generate(**batch, generation_config=generation_config)
    # Forced: "auto" would take whichever kernel its eager timing chose for these tiny shapes.
    fast = enable_compiled_decoding(set_linear_kernel(copy.deepcopy(model), "onednn"))
    assert torch.equal(fast.generate(**batch, generation_config=generation_config), expected)  # compiles
    with torch.profiler.profile() as profile:
        tokens = fast.generate(**batch, generation_config=generation_config)
    assert torch.equal(tokens, expected)
    events = {event.key for event in profile.key_averages()}
    assert any("CompiledFxGraph" in key or "Torch-Compiled Region" in key for key in events)
    assert "selfattn::onednn_linear" in events  # oneDNN called from the compiled steps


@pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="oneDNN runs on x86 CPUs with a oneDNN build of torch only")
def test_compiled_decoding_packs_the_decoders_weights_and_repacks_those_changed_through_data(monkeypatch):
    """The decoder's layers (and the LM head) with the default kernel take "auto-packed", the encoder's keep theirs;
    each generate() repacks a weight edited through `.data` (as PEFT's merge edits), which autograd does not see;
    enabled=False restores the kernels."""
    torch._dynamo.reset()
    monkeypatch.setattr(kernels, "_chosen_kernels", {})
    real_timing = kernels.time_kernels
    # Reported faster, oneDNN on the packed copies runs wherever it is timed: the copies are what this tests.
    monkeypatch.setattr(kernels, "time_kernels", lambda runs: ({"onednn": 1.0, "aten": 2.0}, real_timing(runs)[1]))
    model = build(
        SelfAttnForConditionalGeneration, "encoder_decoder", tie_word_embeddings=False, initializer_range=0.2,
        type_vocab_size=0,
    )
    plain = set_linear_kernel(copy.deepcopy(model), "aten")
    set_linear_kernel(model.model.decoder.layers[0].self_attn.q_proj, "aten")  # the caller's choice, kept
    fast = enable_compiled_decoding(model)
    encoder_layers = set(fast.model.encoder.modules())
    for name, module in fast.named_modules():
        if isinstance(module, kernels.Linear):
            expected_kernel = "auto" if module in encoder_layers else "auto-packed"
            assert module.kernel == ("aten" if name == "model.decoder.layers.0.self_attn.q_proj" else expected_kernel)
    batch = padded_batch(lengths=(8, 5, 3))
    generation_config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.profiler.profile() as profile:
        tokens = fast.generate(**batch, generation_config=generation_config)
    assert torch.equal(tokens, plain.generate(**batch, generation_config=generation_config))
    assert compiled_steps_ran(fast)
    assert "selfattn::onednn_linear" in {event.key for event in profile.key_averages()}
    assert fast.lm_head.weight.untyped_storage() in kernels._onednn_packed_weights
    for edited in (fast, plain):
        with torch.no_grad():
            edited.lm_head.weight.data.mul_(-1)
    changed = plain.generate(**batch, generation_config=generation_config)
    assert not torch.equal(changed, tokens)  # the edit matters...
    assert torch.equal(fast.generate(**batch, generation_config=generation_config), changed)  # ...and is seen
    enable_compiled_decoding(fast, False)
    assert {module.kernel for module in fast.modules() if isinstance(module, kernels.Linear)} == {"auto", "aten"}


@pytest.mark.parametrize(
    "compile_options, expected",
    [
        ({}, {"options": {"cpp_wrapper": True}}),  # Inductor's C++ wrapper
        ({"backend": "inductor"}, {"backend": "inductor", "options": {"cpp_wrapper": True}}),
        ({"mode": "max-autotune-no-cudagraphs"}, {"mode": "max-autotune-no-cudagraphs"}),  # the caller's
        ({"options": {"cpp_wrapper": False}}, {"options": {"cpp_wrapper": False}}),
        ({"backend": "aot_eager"}, {"backend": "aot_eager"}),  # cpp_wrapper is Inductor's
    ],
    ids=["default", "inductor", "callers_mode", "callers_options", "aot_eager"],
)
def test_compiled_decoding_on_cpu_uses_inductors_cpp_wrapper_unless_told_otherwise(
    compile_options, expected, monkeypatch
):
    model = build(SelfAttnForCausalLM, "decoder", type_vocab_size=0)
    options = enable_compiled_decoding(model, **compile_options).forward.step_compile_options()
    assert options == {**fast_paths.STEP_COMPILE_DEFAULTS, **expected}
    # Neither on CUDA nor on the CPU (Apple's MPS, Intel's XPU): the caller's options alone.
    monkeypatch.setattr(fast_paths, "device_type", lambda model: "mps")
    options = enable_compiled_decoding(model, **compile_options).forward.step_compile_options()
    assert options == {**fast_paths.STEP_COMPILE_DEFAULTS, **compile_options}


@pytest.mark.parametrize(
    "compile_options, device_map, expected_mode",
    [
        ({}, None, "reduce-overhead"),  # CUDA graphs
        ({"backend": "inductor"}, None, "reduce-overhead"),
        ({"mode": "default"}, None, "default"),  # the caller's
        ({"options": {"triton.cudagraphs": False}}, None, None),  # torch.compile takes a mode or options, not both
        ({"backend": "aot_eager"}, None, None),  # modes are Inductor's
        ({"backend": lambda graph, inputs: graph}, None, None),
        ({}, {"model.decoder": 0, "lm_head": "cpu"}, None),  # offloaded: transformers compiles none either
    ],
    ids=["default", "inductor", "callers_mode", "options", "aot_eager", "own_backend", "offloaded"],
)
def test_compiled_decoding_on_cuda_uses_cuda_graphs_where_inductor_compiles_it(
    compile_options, device_map, expected_mode, monkeypatch
):
    # The CUDA case on CPU: the model counts as on CUDA (tests/test_cuda.py runs it on a GPU).
    monkeypatch.setattr(fast_paths, "device_type", lambda model: "cuda")
    model = build(SelfAttnForCausalLM, "decoder", type_vocab_size=0)
    if device_map is not None:
        model.hf_device_map = device_map
    options = enable_compiled_decoding(model, **compile_options).forward.step_compile_options()
    assert options.get("mode") == expected_mode
    assert {key: value for key, value in options.items() if key != "mode"} == {
        **fast_paths.STEP_COMPILE_DEFAULTS, **{k: v for k, v in compile_options.items() if k != "mode"}
    }


def test_only_one_token_steps_on_a_cache_holding_positions_run_compiled(monkeypatch):
    """On CUDA a static layer counts as holding positions once initialized (its length is not read back): a cache
    reset and used again must still run prompts longer than one token through the plain forward, with its input
    checks and without compiling each prompt length (fullgraph would give up after torch's recompile limit)."""
    initialized = lambda layer: isinstance(layer, StaticLayer) and layer.is_initialized  # noqa: E731
    monkeypatch.setattr(fast_paths, "holds_positions", initialized)
    torch._dynamo.reset()
    model = build(SelfAttnForCausalLM, "decoder", type_vocab_size=0)
    config = model.config
    expected = build(SelfAttnForCausalLM, "decoder", type_vocab_size=0)
    enable_compiled_decoding(model, backend="eager")
    cache, expected_cache = StaticCache(config, max_cache_len=16), StaticCache(config, max_cache_len=16)
    with torch.no_grad():
        for length in range(1, 12):  # a prompt of each length, the cache reset in between, then one step
            cache.reset()
            expected_cache.reset()
            ids = torch.randint(3, 99, (1, length), generator=torch.Generator().manual_seed(length))
            prompt = model(input_ids=ids, cache=cache, use_cache=True)
            step = model(input_ids=prompt.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
            reference = expected(input_ids=ids, cache=expected_cache, use_cache=True)
            reference_step = expected(input_ids=prompt.logits[:, -1:].argmax(-1), cache=expected_cache, use_cache=True)
            torch.testing.assert_close(step.logits, reference_step.logits, rtol=0, atol=TOLERANCE)
            torch.testing.assert_close(prompt.logits, reference.logits, rtol=0, atol=TOLERANCE)
        assert model.forward.compiled_step is not None
        cache.reset()
        with pytest.raises(ValueError, match="input_ids contains ids outside the vocabulary"):
            model(input_ids=torch.tensor([[3, 500, 4]]), cache=cache, use_cache=True)  # checked: the plain forward


def translator_and_greedy_config():
    model = build(SelfAttnForConditionalGeneration, "encoder_decoder", tie_word_embeddings=False, initializer_range=0.2)
    return model, GenerationConfig(max_new_tokens=4, min_new_tokens=4, do_sample=False)


def test_compiled_decoding_takes_sources_of_every_length_in_two_graphs():
    """A source length other than the first's compiles the step once more, the length a symbol in it (torch.compile's
    dynamic=None): ten lengths, more than torch.compile's recompile limit (8), take two graphs and give the plain
    model's tokens. Of each length, one batch is padded enough for the encoder's unpadded path and one not: the
    output of either must not be a view (torch.compile guards an input's view base: a third graph)."""
    torch._dynamo.reset()
    counter = CompileCounter()
    model, generation_config = translator_and_greedy_config()
    fast = enable_compiled_decoding(copy.deepcopy(model), backend=counter)
    for lengths in [(longest, shortest) for longest in range(2, 12) for shortest in (1, longest)]:
        batch = padded_batch(lengths=lengths, seed=lengths[0])
        expected = model.generate(**batch, generation_config=generation_config)
        assert torch.equal(fast.generate(**batch, generation_config=generation_config), expected), lengths
    assert counter.frame_count == 2


def test_compiled_decoding_past_the_recompile_limit_decodes_uncompiled_with_a_warning(caplog):
    """Each batch size needs a graph of its own (the static cache's buffers are sized for it). Past torch.compile's
    recompile limit (here 2), where torch would fail the call (fullgraph), a generate() runs its steps through the
    plain forward: the same tokens, one warning that names the limit, no more graphs."""
    torch._dynamo.reset()
    counter = CompileCounter()
    model, generation_config = translator_and_greedy_config()
    fast = enable_compiled_decoding(copy.deepcopy(model), backend=counter)
    with torch._dynamo.config.patch(recompile_limit=2), caplog.at_level(logging.WARNING):
        for size in (1, 2, 3, 4):
            batch = padded_batch(lengths=(6, 5, 4, 3)[:size], seed=size)
            expected = model.generate(**batch, generation_config=generation_config)
            assert torch.equal(fast.generate(**batch, generation_config=generation_config), expected), size
    assert counter.frame_count == 2
    warnings = [record.getMessage() for record in caplog.records if record.name == fast_paths.__name__]
    assert len(warnings) == 1 and "recompile_limit = 2" in warnings[0] and "the same tokens" in warnings[0]


def test_turning_compiled_decoding_off_gives_back_the_generation_settings_it_replaced():
    model = build(SelfAttnForCausalLM, "decoder", type_vocab_size=0)
    model.generation_config.cache_implementation, model.generation_config.disable_compile = "dynamic", True
    enable_compiled_decoding(model)
    enable_compiled_decoding(model, backend="eager")  # enabled again: what it replaced is still the user's
    assert (model.generation_config.cache_implementation, model.generation_config.disable_compile) == ("static", True)
    enable_compiled_decoding(model, False)
    assert (model.generation_config.cache_implementation, model.generation_config.disable_compile) == ("dynamic", True)
    # Settings the user changed while it was on stay; turning off a model never enabled changes nothing.
    enable_compiled_decoding(model)
    model.generation_config.cache_implementation = "offloaded"
    enable_compiled_decoding(model, False)
    assert model.generation_config.cache_implementation == "offloaded"
    enable_compiled_decoding(model, False)
    assert model.generation_config.cache_implementation == "offloaded"


def test_compiled_decoding_is_refused_by_a_model_that_does_not_generate():
    with pytest.raises(ValueError, match="does not generate"):
        enable_compiled_decoding(build(SelfAttnForMaskedLM))


def test_compiled_decoding_refuses_compile_options_it_would_drop_or_torch_compile_does_not_take():
    # Checked at once: the step compiles only at the first decoding step of a generate(), long after the call.
    model = build(SelfAttnForCausalLM, "decoder", type_vocab_size=0)
    with pytest.raises(TypeError, match=r"turns compiled decoding off.*\(mode\) would be ignored"):
        enable_compiled_decoding(model, False, mode="max-autotune")
    with pytest.raises(TypeError, match=r"has no option not_an_option; it takes fullgraph, .*backend, mode"):
        enable_compiled_decoding(model, not_an_option=1)
    assert "forward" not in model.__dict__ and model.generation_config.cache_implementation is None
    enable_compiled_decoding(model, True, backend="eager", fullgraph=True)  # torch.compile's own option names
    with pytest.raises(TypeError, match="would be ignored"):
        enable_compiled_decoding(model, False, backend="eager")
    assert isinstance(model.__dict__["forward"], fast_paths.CompiledDecodingForward)  # as it was


@pytest.mark.parametrize(
    "arguments, options, error, message",
    [
        ((), {"mode": "bogus-mode"}, ValueError, r"\(model, mode='bogus-mode'\): .* refuses this: .*bogus"),
        ((), {"backend": "no_such_backend"}, ValueError, r"backend='no_such_backend'\): .*leave out backend"),
        ((), {"mode": "max-autotune", "options": {"cpp_wrapper": True}}, ValueError, r"together.*mode and options"),
        ((), {"options": {"not_an_inductor_option": 1}}, ValueError, r"options=\{'not_an_inductor_option': 1\}\)"),
        ((), {"backend": 3}, TypeError, r"backend=3\): backend must be the name of a torch.compile backend"),
        (("no",), {}, TypeError, r"enabled='no'\): enabled must be True or False"),
        ((1,), {}, TypeError, r"enabled=1\): enabled must be True or False"),
    ],
    ids=["mode", "backend", "mode_and_options", "inductor_option", "backend_type", "enabled_string", "enabled_int"],
)
def test_compiled_decoding_refuses_bad_option_values_and_enabled_at_once(arguments, options, error, message):
    # torch.compile would raise these only at the first compiled step, failing that generate() and every later one.
    model = build(SelfAttnForCausalLM, "decoder", type_vocab_size=0)
    with pytest.raises(error, match=message):
        enable_compiled_decoding(model, *arguments, **options)
    assert "forward" not in model.__dict__ and model.generation_config.cache_implementation is None


def test_checking_compile_options_compiles_nothing():
    torch._dynamo.reset()
    counter = CompileCounter()
    model = build(SelfAttnForCausalLM, "decoder", type_vocab_size=0)
    enable_compiled_decoding(model, backend=counter, dynamic=False)
    enable_compiled_decoding(model, mode="max-autotune-no-cudagraphs")
    assert counter.frame_count == 0 and model.forward.compiled_step is None


@pytest.mark.parametrize(
    "model_class, shape, num_beams, per_token",
    [
        (SelfAttnForConditionalGeneration, "encoder_decoder", 1, None),  # the decoder per tensor (the default)
        (SelfAttnForCausalLM, "decoder", 3, ["*fc1", "*fc2"]),  # per-token layers (Int8RowScaledLinear) too
    ],
    ids=["encoder_decoder-greedy", "decoder-beam3-per_token"],
)
def test_compiled_decoding_of_an_int8_model_generates_its_eager_tokens(model_class, shape, num_beams, per_token):
    """Each int8 layer is one opaque operator inside the compiled step (quantization.INT8_LAYERS), which runs the
    layer's eager forward: the tokens are the eager int8 model's, on copies too, and for a model quantized after a
    compiled float32 step."""
    torch._dynamo.reset()
    model = build(model_class, shape, tie_word_embeddings=False, initializer_range=0.2, type_vocab_size=0)
    batch = padded_batch(lengths=(8, 5, 3), padding_side="right" if shape == "encoder_decoder" else "left")
    generation_config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, num_beams=num_beams, do_sample=False)
    int8 = copy.deepcopy(model).quantize("int8", per_token_activations=per_token)
    expected = int8.generate(**batch, generation_config=generation_config)
    fast = enable_compiled_decoding(copy.deepcopy(int8))
    assert torch.equal(fast.generate(**batch, generation_config=generation_config), expected)  # compiles
    assert compiled_steps_ran(fast)
    with torch.profiler.profile() as profile:
        assert torch.equal(fast.generate(**batch, generation_config=generation_config), expected)
    events = {event.key for event in profile.key_averages()}
    assert any("CompiledFxGraph" in key or "Torch-Compiled Region" in key for key in events)
    assert f"selfattn::{quantization.INT8_LAYER_OPERATOR}" in events
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(fast), torch.load(buffer, weights_only=False)):
        assert torch.equal(other.generate(**batch, generation_config=generation_config), expected)
        assert compiled_steps_ran(other)
        # The copy's step calls the copy's layers, not the original's: with an LM head of its own, its tokens are
        # its own eager ones.
        head = other.lm_head
        fresh = int8_linear(torch.nn.Linear(head.in_features, head.out_features), head.reduce_range)
        head.set_weight_bias(fresh.weight(), fresh.bias())
        plain = enable_compiled_decoding(copy.deepcopy(other), False)
        own = plain.generate(**batch, generation_config=generation_config)
        assert not torch.equal(own, expected)
        assert torch.equal(other.generate(**batch, generation_config=generation_config), own)
    # Quantized after a compiled float32 step: the changed layers make torch.compile trace the step again.
    later = enable_compiled_decoding(copy.deepcopy(model))
    later.generate(**batch, generation_config=generation_config)
    assert compiled_steps_ran(later)
    later.quantize("int8", per_token_activations=per_token)
    assert torch.equal(later.generate(**batch, generation_config=generation_config), expected)


def test_compiled_decoding_keeps_a_forward_installed_on_the_instance():
    # accelerate's device hooks (device_map=..., dispatch_model) wrap the instance's forward; compiled decoding must
    # call through them, and put them back when turned off.
    model = build(SelfAttnForCausalLM, "decoder", type_vocab_size=0)
    calls = []
    plain = model.forward

    def hooked_forward(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    model.forward = hooked_forward
    ids = torch.randint(3, 99, (1, 4))
    enable_compiled_decoding(model)
    model(ids)
    assert len(calls) == 1 and model.forward.instance_forward is hooked_forward
    enable_compiled_decoding(model, False)
    assert model.forward is hooked_forward
    model(ids)
    assert len(calls) == 2


def test_compiled_decoding_forward_keeps_the_models_signature_once():
    # generate() reads the forward's signature at every step: it is computed once, and is the plain forward's, on
    # the model and on its copies (pickled or not), each of which reads its own model's.
    model = build(SelfAttnForConditionalGeneration, "encoder_decoder")
    expected = inspect.signature(model.forward)
    enable_compiled_decoding(model)
    assert inspect.signature(model.forward) == expected
    assert inspect.signature(model.forward) is inspect.signature(model.forward)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert inspect.signature(other.forward) == expected
        assert other.forward.plain_forward.args[0] is other
